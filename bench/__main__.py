"""``make bench``: every measurement in one run, written to ``bench/results.md`` and a plot.

Figures are medians from this machine at the time of the run. The machine is shared, so
compare the ratios (pool against its peer measured minutes apart), not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _table(rows: list[tuple[str, ...]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.1f}x" if theirs else "n/a"


def _e2e_section(results: dict[str, Any]) -> list[str]:
    setups = [(name, results[key]) for name, key in (
        ("pool + PoolBroker", "pool"),
        ("pool + RedisStreamBroker", "pool_redis"),
        ("taskiq 0.13 + taskiq-redis", "taskiq"),
        ("taskiq-redis's RedisStreamBroker under `pool run`", "taskiq_on_pool"),
    ) if results.get(key)]  # fmt: skip
    peer = results.get("taskiq")
    release = results.get("release", {}).get("release")
    commit = results.get("release", {}).get("release_commit", {}).get("commit", "")
    rows: list[tuple[str, ...]] = [
        ("setup (2 workers)", "throughput tasks/s", "vs taskiq", f"vs release {commit}",
         "round trip p50 ms", "p99 ms", "p50 vs taskiq", "p50 vs release"),
    ]  # fmt: skip
    if release:
        setups.append((f"release {commit} + its PoolBroker (section 0)", release))
    limit = results.get("limit")
    if limit:
        setups.append(("the limit: the same processes and hops, essentials only", limit))
    for name, fig in setups:
        thr, p50 = fig["throughput_tasks_per_s"], fig["p50_ms"]
        rows.append((
            name,
            f"{thr:.0f}",
            _ratio(thr, peer["throughput_tasks_per_s"]) if peer else "",
            _ratio(thr, release["throughput_tasks_per_s"]) if release else "",
            f"{p50:.3f}",
            f"{fig['p99_ms']:.3f}",
            f"1/{peer['p50_ms'] / p50:.0f}" if peer else "",
            f"{p50 / release['p50_ms']:.2f}x" if release else "",
        ))  # fmt: skip
    notes = [
        "Round trip = `kiq` then `wait_result()` with default arguments (taskiq polls its "
        "result backend every 0.2 s by default; pool's results are pushed)."
    ]
    if limit:
        ours = results["pool"]
        share = ours["throughput_tasks_per_s"] / limit["throughput_tasks_per_s"]
        notes.append(
            "*The limit* (`python -m bench.limit`): a producer, a relay and 2 workers on Unix "
            "sockets, JSON messages with the task id in a frame header, every result decoded "
            "and checked, each task written when sent, one write per peer per read "
            "elsewhere; none of taskiq's code and nothing of what pool adds. pool + "
            f"PoolBroker does {share:.0%} of its throughput; its round trip p50 is "
            f"{ours['p50_ms'] / limit['p50_ms']:.2f}x the limit's."
        )
        notes += _wake_notes(ours, limit)
    notes += _cpu_notes(results)
    if peer and "fast_poll" in peer:
        fast = peer["fast_poll"]
        notes.append(
            f"taskiq with `wait_result(check_interval=0.01)`: p50 {fast['p50_ms']:.3f} ms, "
            f"p99 {fast['p99_ms']:.3f} ms; pool + PoolBroker's p50 is "
            f"1/{fast['p50_ms'] / results['pool']['p50_ms']:.0f} of that."
        )
    return [
        "## 1-2. End to end: no-op tasks in batches of 1,000, then sequential round trips",
        _table(rows),
        *notes,
    ]


def _wake_notes(ours: dict[str, Any], limit: dict[str, Any]) -> list[str]:
    """What a wake-up costs on this machine, and the round trips without those across CPUs."""
    wake = limit.get("wake_us")
    if not wake or "one_cpu_p50_ms" not in ours:
        return []
    across = wake["across_cpus"]
    return [
        "*Wake-ups*: 40 bytes there and back between two processes (two wake-ups) take "
        f"{wake['same_cpu']:.0f} µs on one CPU"
        + (f" and {across:.0f} µs across two" if across is not None else "")
        + ". With every process on one CPU, the round trip p50 is "
        f"{ours['one_cpu_p50_ms']:.3f} ms for pool + PoolBroker (against "
        f"{ours['p50_ms']:.3f} on two) and {limit['one_cpu_p50_ms']:.3f} ms for the limit "
        f"(against {limit['p50_ms']:.3f})."
    ]


def _cpu_notes(results: dict[str, Any]) -> list[str]:
    """CPU µs per task of each process of pool + PoolBroker, beside taskiq's own floor."""
    cpu = results["pool"].get("cpu_us_per_task")
    if not cpu:
        return []
    floor = results.get("floor", {})
    limit = results.get("limit", {}).get("cpu_us_per_task", {})
    rows: list[tuple[str, ...]] = [
        ("process", "CPU µs per task", "floor µs", "over the floor", "the limit µs")
    ]
    for name, value in cpu.items():
        if name == "other children" and value < 0.5:
            continue
        kind = "worker" if name.startswith("worker") else name
        base = floor.get(kind)
        if kind == "worker" and base is not None:
            base = base / max(1, sum(n.startswith("worker") for n in cpu))  # tasks split
        if name == "total" and floor:
            base = floor["producer"] + floor["supervisor"] + floor["worker"]
        bare = limit.get("relay" if name == "supervisor" else name)
        rows.append((
            name, f"{value:.1f}", f"{base:.1f}" if base else "",
            f"{value / base:.1f}x" if base else "", f"{bare:.1f}" if bare else "",
        ))  # fmt: skip
    return [
        "CPU per task during the throughput run of pool + PoolBroker (user + system time of "
        "each process over the run / tasks; a worker runs half the tasks). The floor is "
        "taskiq's own code for one no-op task in one process without any pool I/O "
        "(`python -m bench.floor`): its kicker and result decoding (producer), its receiver "
        "(worker), the frames of one task (supervisor). *The limit* is the same process "
        "in `bench.limit` (the relay for the supervisor).",
        _table(rows),
    ]


def _state_section(results: dict[str, Any]) -> list[str]:
    from bench.state_bench import OPERATIONS

    state = results["state"]
    ours, lmdb = state["pool_state"], state.get("lmdb", {})
    manager, redis = state["manager_dict"], state.get("redis", {})
    labels = {
        "get_unchanged": "get, unchanged key",
        "set": "set",
        "incr": "incr (Manager: get + set under a Manager lock; Redis: INCR)",
        "get_changed": "get of a key another process just changed",
        "lock": "lock taken and released (Redis: SET NX, then DEL)",
    }
    rows: list[tuple[str, ...]] = [(
        "operation", "pool state µs", "raw LMDB µs", "pool / LMDB (goal: 10x)",
        "Manager dict µs", "Manager / pool", "Redis µs", "Redis / pool",
    )]  # fmt: skip

    def us(side: dict[str, float], key: str) -> str:
        return f"{side[key]:.2f}" if key in side else ""

    def over(top: dict[str, float], bottom: dict[str, float], key: str) -> str:
        return _ratio(top[key], bottom[key]) if key in top and key in bottom else ""

    for op in OPERATIONS:
        k = f"{op}_us"
        if k in ours:
            rows.append((
                labels[op], us(ours, k), us(lmdb, k), over(ours, lmdb, k),
                us(manager, k), over(manager, ours, k), us(redis, k), over(redis, ours, k),
            ))  # fmt: skip
    worker = results["pool"]["state_in_worker"]
    return [
        "## 3. Shared state from one client (median µs per operation)",
        _table(rows),
        "*Raw LMDB* is py-lmdb configured as pool's store (the shared memory pool's state"
        " lives in), measured in turns with pool's state: the shared-memory floor. A changed"
        " get is one read just after another process wrote the key. Reproduce:"
        " `python -m bench.state_bench`.",
        "From inside a pool worker: " + ", ".join(f"{k} {v:.2f} µs" for k, v in worker.items()),
    ]


def _ops_section(results: dict[str, Any]) -> list[str]:
    ops = results["ops"]
    rows: list[tuple[str, ...]] = [("figure", "value")]
    for row in ops["scale"]:
        method = row["start_method"]
        rows.append((f"`scale 8` from 2, {method}", f"{row['scale_2_to_8_s']:.2f} s"))
        rows.append((f"idle worker RSS, {method}", f"{row['idle_worker_rss_mib']:.1f} MiB"))
        rows.append((f"supervisor RSS, {method}", f"{row['supervisor_rss_mib']:.1f} MiB"))
    for key, value in ops["by_workers"].items():
        kind, workers = key.split("_")
        label = "no-op" if kind == "noop" else "CPU-bound sync (20k-iteration loop)"
        rows.append((f"{label}, {workers[:-1]} worker(s)", f"{value:.0f} tasks/s"))
    cost = ops["stats_cost"]
    rows.append(("throughput while `stats --watch` polls / without", f"{cost['ratio']:.2f}"))
    return ["## 4-5. Workers, scaling and memory (pool + PoolBroker)", _table(rows)]


def _chaos_section(results: dict[str, Any]) -> list[str]:
    chaos = results["chaos"]
    rows: list[tuple[str, ...]] = [
        ("run", "tasks", "workers killed", "lost", "ran twice", "gave up", "tasks/s"),
    ]
    for name in ("calm", "chaos"):
        run = chaos[name]
        rows.append((
            name, str(run["tasks"]), str(run["kills"]), str(run["lost"]),
            str(run["ran_twice_or_more"]), str(run["gave_up"]),
            f"{run['throughput_tasks_per_s']:.0f}",
        ))  # fmt: skip
    when = f" (measured {results['chaos_when']})" if "chaos_when" in results else ""
    return [
        f"## 6. Chaos: a random worker SIGKILLed every 0.5 s (2 workers){when}",
        _table(rows),
        f"Throughput under chaos / calm: {chaos['chaos']['throughput_vs_calm']:.2f}. "
        "Each task increments its own counter in the shared state, so *ran twice* counts "
        "tasks redelivered after their worker died mid-run (at-least-once delivery).",
    ]


def _faults_section(results: dict[str, Any]) -> list[str]:
    faults = results["faults"]
    rows: list[tuple[str, ...]] = [
        ("fault", "sent", "lost", "ran twice", "innocent failures", "what else"),
    ]
    described = (
        ("producer_exit", "producer exits right after its last `kiq` (no shutdown)",
         lambda f: ""),
        ("supervisor_sigkill", "supervisor SIGKILLed, next `pool run` on the run dir",
         lambda f: f"{f['held_at_kill']:,} held by the supervisor when killed"),
        ("graceful_stop", "SIGTERM while the producer keeps sending, next `pool run`",
         lambda f: f"exit status {f['exit_status']}"),
        ("poison", "worker-killing tasks among the others (2 workers)",
         lambda f: f"{f['poison']} poison, {f['poison_failed_as_crash']} answered with "
                   f"WorkerCrashedError; {f['workers_restarted']} worker restarts"),
        ("redis_poison", "worker-killing tasks among the others, pool's Redis broker (2 workers)",
         lambda f: f"{f['poison']} poison, {f['poison_failed_as_crash']} answered with "
                   f"WorkerCrashedError; {f['workers_restarted']} worker restarts"),
        ("full_disk", "run dir on a 1 MiB tmpfs: full, SIGTERM, next run on 256 MiB",
         lambda f: f"critical log: {'yes' if f['critical_logged'] else 'NO'}; "
                   f"{f['journaled_at_sigterm']:,} in the journal at SIGTERM, "
                   f"{f['kiq_returned_when_full']:,} kiq returned; tracebacks "
                   f"{f['tracebacks']}; next run read the whole journal: "
                   f"{'yes' if f['next_run_read_whole_journal'] else 'NO'}"),
    )  # fmt: skip
    for key, label, more in described:
        fig = faults.get(key)
        if fig is None:
            continue
        if "skipped" in fig:
            rows.append((label, "", "", "", "", f"skipped: {fig['skipped']}"))
            continue
        rows.append((
            label, f"{fig['sent']:,}", str(fig["lost"]), str(fig["ran_twice"]),
            str(fig["innocent_failures"]), more(fig),
        ))  # fmt: skip
    when = f" (measured {results['chaos_when']})" if "chaos_when" in results else ""
    parts = [
        f"## 7. Faults: what each one loses{when}",
        _table(rows),
        "*Lost*: `kiq` returned and the task never ran, or its handle got no result. Every "
        "run appends the task's tag to a file, so runs are counted across pools; *ran twice* "
        "is at-least-once delivery (a task whose worker died before its acknowledgement). "
        "In the full-disk run the producer goes on sending through the restart; it "
        "reconnects and asks again for every result its handles still wait for, those of "
        "the tasks the next run resumed too.",
    ]
    cost = faults.get("journal_cost")
    if cost:
        rounds = cost["rounds"]
        parts.append(
            f"Journal cost (no-op tasks, {cost['tasks']:,} per round, {rounds} interleaved "
            f"rounds, medians): journal on {cost['journal_tasks_per_s']:.0f} tasks/s, "
            f"`--no-journal` {cost['no_journal_tasks_per_s']:.0f} tasks/s; on / off = "
            f"{cost['journal_vs_no_journal']:.2f} (cost {cost['journal_cost'] * 100:.0f}%). "
            "Rounds: on "
            + ", ".join(f"{v:.0f}" for v in cost["samples"]["journal"])
            + "; off "
            + ", ".join(f"{v:.0f}" for v in cost["samples"]["no_journal"])
            + "."
        )
    return parts


def _control_section(results: dict[str, Any]) -> list[str]:
    control = results["control"]
    rows: list[tuple[str, ...]] = [("mode (no-op tasks)", "tasks/s", "vs plain")]
    for name, value in control["tasks_per_s"].items():
        rows.append((name, f"{value:.0f}", f"{control['vs_plain'][name]:.2f}"))
    return [
        "## 8. Task control: the cost of priority and limits (PoolBroker)",
        _table(rows),
        f"Median of {control['rounds']} interleaved rounds of {control['tasks']:,} tasks on one "
        "pool of 2 workers. Reproduce: `python -m bench.control_bench`.",
    ]


def _observe_section(results: dict[str, Any]) -> list[str]:
    rows: list[tuple[str, ...]] = [(
        "subscriber", "tasks/s without", "with", "throughput cost", "its quartiles",
        "pool CPU µs/task without", "with", "pool CPU cost", "subscriber's CPU µs/task",
        "events seen per task",
    )]  # fmt: skip
    for fig in results["observe"]:
        seen = fig.get("events_seen_per_task")
        rows.append((
            fig["subscriber"],
            f"{fig['without_subscriber_tasks_per_s']:.0f}",
            f"{fig['with_subscriber_tasks_per_s']:.0f}",
            f"{fig['cost_percent']:.1f}%",
            "{:.1f}% to {:.1f}%".format(*fig.get("cost_percent_quartiles", (float("nan"),) * 2)),
            f"{fig['pool_cpu_us_per_task_without']:.1f}",
            f"{fig['pool_cpu_us_per_task_with']:.1f}",
            f"{fig['pool_cpu_cost_percent']:.1f}%",
            f"{fig['subscriber_cpu_us_per_task']:.1f}",
            "digest" if seen is None else f"{seen:.2f}",
        ))  # fmt: skip
    return [
        "## 9. Seeing the pool: throughput with an event subscriber or the dashboard open",
        _table(rows),
        "Alternating rounds on one pool of 2 workers (without, with, ..., without). *Throughput "
        "cost*: the median over the rounds with a subscriber of each one's drop against the "
        "mean of the two rounds without around it, so that the machine's drift cancels; the "
        "tasks/s are medians. *Pool CPU* is the producer's, "
        "the supervisor's, the workers' and the state server's, per task; the subscriber's own "
        "processes (Chromium, `pool events`) share this machine's 2 cores, so they lower "
        "throughput too. *Events seen per task* is 3 when the subscriber kept up (received, "
        "started, succeeded); the page reads a digest and the stats once a second. Reproduce: "
        "`python -m bench.observe_bench [--subscriber both|cli|in_process|dashboard]`.",
    ]


def _release_section(results: dict[str, Any]) -> list[str]:
    release, current = results["release"]["release"], results["release"]["current"]
    commit = results["release"]["release_commit"]["commit"]
    rows: list[tuple[str, ...]] = [("figure", f"release {commit}", "this tree", "this / release")]
    for key, label, fmt in (
        ("throughput_tasks_per_s", "throughput, PoolBroker, 2 workers (tasks/s)", "{:.0f}"),
        ("p50_ms", "round trip p50 (ms)", "{:.3f}"),
        ("p99_ms", "round trip p99 (ms)", "{:.3f}"),
        ("import_ms", "`import pool; pool.PoolBroker` (ms, new interpreter)", "{:.0f}"),
        ("idle_worker_rss_mib", "idle worker RSS (MiB)", "{:.1f}"),
        ("supervisor_rss_mib", "supervisor RSS (MiB)", "{:.1f}"),
    ):
        rows.append((
            label, fmt.format(release[key]), fmt.format(current[key]),
            f"{current[key] / release[key]:.2f}",
        ))  # fmt: skip
    return [
        "## 0. Before and after building on taskiq (same run, same machine)",
        _table(rows),
        f"`release` is a git worktree of {commit}, pool's own re-implementation of taskiq's "
        "API; `this tree` runs taskiq 0.13's own kicker, message, receiver and result types.",
    ]


def _memory_section(results: dict[str, Any]) -> list[str]:
    fig = results["memory"]
    rows: list[tuple[str, ...]] = [("process (idle)", "PSS MiB", "anon", "files", "USS MiB")]
    procs = {**fig["pool"]["processes"], "**total**": fig["pool"]["total"]}
    procs.update({f"one interpreter, `{code}`": row for code, row in fig["bare"].items()})
    for name, row in procs.items():
        rows.append((
            name, f"{row['pss_mib']:.1f}", f"{row['pss_anon_mib']:.1f}",
            f"{row['pss_files_mib']:.1f}", f"{row['uss_mib']:.1f}",
        ))  # fmt: skip
    layers: list[tuple[str, ...]] = [("import (one fresh process, in this order)", "anon MiB",
                                      "PSS MiB")]  # fmt: skip
    for row in fig["layers"]:
        layers.append((row["layer"], f"{row['anon_mib']:.1f}", f"{row['pss_mib']:.1f}"))
    floor = fig["forked_child_uss_mib"]
    plain = results.get("memory_plain")
    installs: list[tuple[str, ...]] = [
        ("environment", "FastAPI installed", "pool's idle PSS MiB", "USS MiB",
         "the least its imports allow MiB"),
    ]  # fmt: skip
    for name, env in (("this venv (`.[dev,bench]`)", fig), ("`pip install taskiq-pool`", plain)):
        if env and "least_pss_mib" in env:
            installs.append((
                name, str(env["fastapi_installed"]), f"{env['pool']['total']['pss_mib']:.1f}",
                f"{env['pool']['total']['uss_mib']:.1f}", f"{env['least_pss_mib']:.1f}",
            ))  # fmt: skip
    least = [
        _table(installs),
        "*The least its imports allow*: the supervisor's imports in one process (the sum of "
        "the layers below) plus, for each of the other 3 processes, a child forked from it "
        "that runs an idle event loop. A child forked from the imports is the cheapest "
        f"process there is (a fresh interpreter alone is {fig['bare']['pass']['pss_mib']:.1f} "
        "MiB), so 4 processes cost at "
        "least this while one of them imports taskiq. `.venv-plain` is a venv with "
        "pool and its dependencies only (taskiq-fastapi, a test dependency, brings FastAPI "
        "into the dev venv).",
    ] if len(installs) > 1 else []  # fmt: skip
    return [
        "## 10. Idle memory: supervisor, state server and 2 workers (PoolBroker)",
        _table(rows),
        *least,
        f"Python {fig['python_version']}, FastAPI installed: {fig['fastapi_installed']}. "
        "PSS splits a shared page among the processes that map it, so the total is what the "
        "pool costs the machine; USS is a process's own pages. What one process pays for "
        "each import:",
        _table(layers),
        f"A child forked from the supervisor's imports costs {floor['sleep']:.1f} MiB (USS) "
        f"asleep, {floor['loop']:.1f} MiB with an idle event loop: the least a worker can "
        "cost. Reproduce: `python -m bench.memory_bench` (`--python PATH` for another "
        "environment, e.g. a venv with `pip install taskiq-pool` only).",
    ]


def _redis_peers_section(results: dict[str, Any]) -> list[str]:
    from bench import redis_peers

    fig = results["redis_peers"]
    skipped = "".join(f" Skipped: {key}, {why}." for key, why in fig["skipped"].items())
    return [
        f"## 11. pool + Redis against the Redis peers (measured {fig['when']})",
        _table(redis_peers.rows(fig)),
        redis_peers.verdict(fig),
        f"One Redis 127.0.0.1:6379, 2 worker processes per setup, a no-op task. Throughput: "
        f"{fig['tasks']:,} tasks in batches of 1,000, every result awaited and checked, each "
        "batch *sent at once* where the producer's client is asyncio's (`asyncio.gather` of "
        "the sends; saq's `Queue.map`) or *one send after another* (each awaited before the "
        "next); dramatiq's and Celery's clients block, so they send one after another in both "
        "columns (marked \\*); round "
        f"trip: {fig['calls']} sequential send-and-await. Medians of {fig['rounds']} rounds, "
        f"the peers interleaved. Where a peer polls (taskiq's `wait_result`, arq's worker and "
        f"`Job.result`, saq's `Queue.map`, dramatiq's idle consumer) the interval is "
        f"{fig['poll_s'] * 1000:g} ms instead of its default (0.2 s, 0.5 s, 0.5 s, up to "
        f"1 s). *Commands* and *round trips* per task are counted in one more batch per setup "
        "by a proxy in front of Redis, split between the producer and the workers: a command "
        "is a request as a client sends it (`MULTI` and `EXEC` count; `EVALSHA` counts once), "
        "a round trip a burst of requests on a connection before its reply. *Server "
        "commands* is the `INFO commandstats` delta over that batch: it adds the calls made "
        "inside Lua scripts, and whatever other clients of that Redis did meanwhile. saq's "
        "round trip re-reads its job every 50 ms (a job that completes between saq's read and "
        "its pub/sub subscription is never announced): that is its p99. Celery runs its "
        "default prefork pool (2 children and their parent). *Idle PSS* is the whole "
        "deployment's (the worker processes and all their children: pool's supervisor, state "
        "server and workers) 2 s after the producer is done, a median over the rounds." + skipped,
        _table(redis_peers.commands_table(fig)),
        "Reproduce: `python -m bench.redis_peers [--rounds N] [--tasks N]`; the profile of "
        "pool's processes: `python -m bench.redis_peers --profile DIR`.",
    ]


def render(results: dict[str, Any]) -> str:
    parts = [
        "# Benchmark results",
        f"{results['when']} on {results['machine']} (2 cores, shared). Reproduce: `make bench`.",
    ]
    if "release" in results:
        parts += _release_section(results)
    parts += _e2e_section(results)
    parts += _state_section(results)
    if "ops" in results:
        parts += _ops_section(results)
    if "chaos" in results:
        parts += _chaos_section(results)
    if "faults" in results:
        parts += _faults_section(results)
    if "control" in results:
        parts += _control_section(results)
    if "observe" in results:
        parts += _observe_section(results)
    if "memory" in results:
        parts += _memory_section(results)
    if results.get("redis_peers"):
        parts += _redis_peers_section(results)
    return "\n\n".join(parts) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = {
        "pool+PoolBroker": results.get("pool"),
        "pool+Redis": results.get("pool_redis"),
        "taskiq+redis": results.get("taskiq"),
        "release": (results.get("release") or {}).get("release"),
        "the limit": results.get("limit"),
    }
    shown = {name: fig for name, fig in setups.items() if fig}
    names = list(shown)
    peers = (results.get("redis_peers") or {}).get("peers", {})
    fig, axes = plt.subplots(1, 3 if peers else 2, figsize=(15 if peers else 10, 4))
    left, right = axes[0], axes[1]
    left.bar(names, [f["throughput_tasks_per_s"] for f in shown.values()], color="tab:blue")
    left.set_title("throughput, no-op tasks (tasks/s)")
    left.tick_params(axis="x", labelsize=8)
    right.bar(names, [f["p50_ms"] for f in shown.values()], color="tab:orange")
    right.tick_params(axis="x", labelsize=8)
    right.set_yscale("log")
    right.set_title("round trip p50 (ms, log scale)")
    if peers:
        axes[2].bar(
            [p["label"].replace(" + ", "+\n") for p in peers.values()],
            [p["throughput_tasks_per_s"] for p in peers.values()],
            color="tab:green",
        )
        axes[2].set_title(
            "Redis peers, tasks/s: batches sent at once\n(dramatiq, Celery: one send after another)"
        )
        axes[2].tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="skip the ops and chaos runs")
    parser.add_argument("--out", type=Path, default=HERE / "results.md")
    parser.add_argument(
        "--features-only",
        action="store_true",
        help="run only the task control and observation sections, into the existing results",
    )
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="run only the idle memory section, into the existing results",
    )
    parser.add_argument(
        "--redis-only",
        action="store_true",
        help="run only what involves Redis (pool + Redis and taskiq-redis under pool in "
        "sections 1-2, the Redis peers), into the existing results",
    )
    parser.add_argument(
        "--state-ops-only",
        action="store_true",
        help="run only the shared state, scaling and memory sections (3-5), into the "
        "existing results",
    )
    parser.add_argument(
        "--chaos-only",
        action="store_true",
        help="run only the chaos and fault sections, into the existing results",
    )
    parser.add_argument(
        "--e2e-only",
        action="store_true",
        help="run only sections 0-2 (PoolBroker, taskiq + taskiq-redis, the release, the "
        "floor, the limit), into the existing results",
    )
    args = parser.parse_args()

    from bench import (
        chaos,
        faults,
        floor,
        limit,
        pool_bench,
        release_peer,
        scale_bench,
        state_bench,
        taskiq_peer,
    )

    def e2e() -> dict[str, Any]:
        return {
            "when": _now(),
            "pool": asyncio.run(pool_bench.measure(2, args.tasks, args.calls)),
            "taskiq": asyncio.run(taskiq_peer.measure(2, args.tasks, args.calls)),
            "release": release_peer.measure(args.tasks, args.calls),
            "floor": floor.measure(),
            "limit": asyncio.run(limit.measure()),
        }

    def redis() -> dict[str, Any]:
        from bench import redis_bench

        return {
            "pool_redis": asyncio.run(redis_bench.measure(2, args.tasks, args.calls)),
            "taskiq_on_pool": asyncio.run(
                taskiq_peer.measure(2, args.tasks, args.calls, runtime="pool")
            ),
            "redis_peers": _redis_peers(),
        }

    def chaos_and_faults() -> dict[str, Any]:
        return {
            "chaos": asyncio.run(chaos.measure(args.tasks)),
            "faults": asyncio.run(faults.measure(args.tasks)),
            "chaos_when": _now(),
        }

    # --X-only: those sections alone, into the results of the last whole run
    only = {
        "features_only": _features,
        "memory_only": _memory,
        "e2e_only": e2e,
        "redis_only": redis,
        "state_ops_only": lambda: {
            "state": state_bench.run(),
            "ops": asyncio.run(scale_bench.measure()),
        },
        "chaos_only": chaos_and_faults,
    }
    for flag, measure in only.items():
        if getattr(args, flag):
            results = json.loads(args.out.with_suffix(".json").read_text())
            if flag == "e2e_only":
                for stale in ("pool_redis", "taskiq_on_pool"):  # not measured in this run
                    results.pop(stale, None)
            results.update(measure())
            _write(results, args.out)
            return

    results: dict[str, Any] = {
        "when": _now(),
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
    }
    results["pool"] = asyncio.run(pool_bench.measure(2, args.tasks, args.calls))
    try:
        from bench import redis_bench

        results["pool_redis"] = asyncio.run(redis_bench.measure(2, args.tasks, args.calls))
    except ImportError:
        results["pool_redis"] = None
    results["taskiq"] = asyncio.run(taskiq_peer.measure(2, args.tasks, args.calls))
    results["taskiq_on_pool"] = asyncio.run(
        taskiq_peer.measure(2, args.tasks, args.calls, runtime="pool")
    )
    results["release"] = release_peer.measure(args.tasks, args.calls)
    results["floor"] = floor.measure()
    results["limit"] = asyncio.run(limit.measure())
    results["state"] = state_bench.run()
    if not args.quick:
        results["ops"] = asyncio.run(scale_bench.measure())
        results.update(_memory())
        results["chaos"] = asyncio.run(chaos.measure(args.tasks))
        results["faults"] = asyncio.run(faults.measure(args.tasks))
        results.update(_features())
    results["redis_peers"] = _redis_peers()
    _write(results, args.out)


def _memory() -> dict[str, Any]:
    """Idle memory in this venv, and in a plain install where ``make bench`` made one."""
    from bench import memory_bench

    plain = Path(__file__).resolve().parent.parent / ".venv-plain" / "bin" / "python"
    figures = {"memory": memory_bench.measure()}
    if plain.exists():
        figures["memory_plain"] = memory_bench.measure_in(str(plain))
    return figures


def _redis_peers() -> dict[str, Any]:
    """Section 10: pool + Redis against dramatiq, saq, arq and taskiq-redis."""
    from bench import redis_peers

    fig = asyncio.run(redis_peers.measure())
    fig["when"] = _now()
    redis_peers.print_report(fig)
    return fig


def _features() -> dict[str, Any]:
    """Sections 8-9: what task control and observation cost."""
    import shutil

    from bench import control_bench, observe_bench

    kinds = ["cli", "in_process"]
    if shutil.which("chromium"):  # the figure first: the page and a subscriber
        kinds = ["both", *kinds, "dashboard"]
    observe = [asyncio.run(observe_bench.measure(kind=kind)) for kind in kinds]
    return {"control": asyncio.run(control_bench.measure()), "observe": observe}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _write(results: dict[str, Any], out: Path) -> None:
    out.write_text(render(results))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    try:
        plot(results, out.with_suffix(".png"))
    except ImportError:  # matplotlib comes with `make bench` (the bench extra)
        print("no matplotlib: the plot is not redrawn")
    print(out.read_text())


if __name__ == "__main__":
    main()
