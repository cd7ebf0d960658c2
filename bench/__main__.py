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
    rows: list[tuple[str, ...]] = [
        ("setup (2 workers)", "throughput tasks/s", "vs taskiq", "round trip p50 ms", "p99 ms",
         "p50 vs taskiq"),
    ]  # fmt: skip
    for name, fig in setups:
        rows.append((
            name,
            f"{fig['throughput_tasks_per_s']:.0f}",
            _ratio(fig["throughput_tasks_per_s"], peer["throughput_tasks_per_s"]) if peer else "",
            f"{fig['p50_ms']:.3f}",
            f"{fig['p99_ms']:.3f}",
            f"1/{peer['p50_ms'] / fig['p50_ms']:.0f}" if peer else "",
        ))  # fmt: skip
    notes = [
        "Round trip = `kiq` then `wait_result()` with default arguments (taskiq polls its "
        "result backend every 0.2 s by default; pool's results are pushed)."
    ]
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


def _state_section(results: dict[str, Any]) -> list[str]:
    ours = results["state"]["pool_state"]
    manager = results["state"]["manager_dict"]
    redis = results["state"].get("redis", {})
    rows: list[tuple[str, ...]] = [
        (
            "operation",
            "pool state µs",
            "pool ops/s",
            "Manager dict µs",
            "Manager / pool",
            "Redis µs",
        )
    ]
    for key, label in (
        ("get_unchanged_us", "get, unchanged key"),
        ("set_us", "set"),
        ("incr_us", "incr (Manager: get + set under a Manager lock; Redis: INCR)"),
    ):
        rows.append((
            label,
            f"{ours[key]:.2f}",
            f"{1e6 / ours[key]:,.0f}",
            f"{manager[key]:.2f}",
            _ratio(manager[key], ours[key]),
            f"{redis[key]:.2f}" if key in redis else "",
        ))  # fmt: skip
    worker = results["pool"]["state_in_worker"]
    return [
        "## 3. Shared state from one client (median µs per operation)",
        _table(rows),
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
    return [
        "## 6. Chaos: a random worker SIGKILLed every 0.5 s (2 workers)",
        _table(rows),
        f"Throughput under chaos / calm: {chaos['chaos']['throughput_vs_calm']:.2f}. "
        "Each task increments its own counter in the shared state, so *ran twice* counts "
        "tasks redelivered after their worker died mid-run (at-least-once delivery).",
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
    return "\n\n".join(parts) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, k in (("pool+PoolBroker", "pool"), ("pool+Redis", "pool_redis"),
                            ("taskiq+redis", "taskiq")) if results.get(k)]  # fmt: skip
    keys = [k for k in ("pool", "pool_redis", "taskiq") if results.get(k)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(names, [results[k]["throughput_tasks_per_s"] for k in keys], color="tab:blue")
    left.set_title("throughput, no-op tasks (tasks/s)")
    right.bar(names, [results[k]["p50_ms"] for k in keys], color="tab:orange")
    right.set_yscale("log")
    right.set_title("round trip p50 (ms, log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="skip the ops and chaos runs")
    parser.add_argument("--out", type=Path, default=HERE / "results.md")
    args = parser.parse_args()

    from bench import chaos, pool_bench, release_peer, scale_bench, state_bench, taskiq_peer

    results: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
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
    results["state"] = state_bench.run()
    if not args.quick:
        results["ops"] = asyncio.run(scale_bench.measure())
        results["chaos"] = asyncio.run(chaos.measure(args.tasks))
    args.out.write_text(render(results))
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(results, args.out.with_suffix(".png"))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
