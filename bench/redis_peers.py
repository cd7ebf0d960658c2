"""pool + Redis against the Redis peers: ``python -m bench.redis_peers [--rounds N] [--tasks N]``.

Peers on the same Redis, 2 worker processes each, a no-op task, every result awaited and
checked: pool + ``pool.redis`` under ``python -m pool run``, taskiq + taskiq-redis, dramatiq
(``RedisBroker`` + ``Results``/``RedisBackend``), saq, arq and Celery (its Redis broker and
result backend, its default prefork pool). Each app is in
``bench/peer_apps``. Per peer and round: start its workers, run its producer
(``bench.peer_apps.drive``) for a throughput batch and sequential round trips, stop and reap
everything, delete the run's keys (each contains a name of that run alone). Rounds interleave
the peers (the order turns each round); figures are medians over rounds.

Then one counting round per peer, through two :class:`~bench.redis_proxy.CountingProxy`
instances (one for the producer, one for the workers): Redis commands and round trips per
task as the clients send them, and the server's ``INFO commandstats`` delta (which includes
the calls made inside Lua scripts, and anything other clients of this Redis did meanwhile).

A peer whose package is missing is skipped, and the reason printed. arq 0.28 pins
redis-py < 6, so it runs from a virtualenv of its own (``make bench-arq``: ``.venv-arq``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.pool_run import ROOT
from bench.redis_proxy import CountingProxy
from bench.stats import median

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
ARQ_PYTHON = Path(os.environ.get("BENCH_ARQ_PYTHON", ROOT / ".venv-arq" / "bin" / "python"))
POLL = 0.005  # seconds, for every knob where a peer polls (see each app's docstring)
IDLE_SETTLE_S = 2.0  # after the producer is done, before the deployment's memory is read


@dataclass(frozen=True)
class Peer:
    key: str  # its module in bench.peer_apps
    label: str
    package: str  # what must import
    python: str
    workers: Callable[[int, str], list[list[str]]]  # (processes, run_dir) -> commands
    at_once: bool = True  # its producer can send a batch at once (an asyncio client)

    def missing(self) -> str | None:
        """Why this peer cannot run here, or None."""
        if self.python == sys.executable:
            if importlib.util.find_spec(self.package) is None:
                return f"`{self.package}` is not installed (pip install -e '.[bench]')"
            return None
        if not Path(self.python).exists():
            return f"{self.python} is missing (make bench-arq)"
        probe = subprocess.run([self.python, "-c", f"import {self.package}"], capture_output=True)
        if probe.returncode != 0:
            return f"`{self.package}` does not import in {self.python}"
        return None


def _each(command: list[str]) -> Callable[[int, str], list[list[str]]]:
    return lambda processes, run_dir: [command] * processes


PY = sys.executable
PEERS = [
    Peer("pool_redis", "pool + pool.redis", "redis", PY, lambda n, run_dir: [[
        PY, "-m", "pool", "run", "bench.redis_apps:broker", "--workers", str(n),
        "--run-dir", run_dir, "--log-level", "WARNING"]]),
    Peer("taskiq_redis", "taskiq + taskiq-redis", "taskiq_redis", PY, lambda n, _: [[
        PY, "-m", "taskiq", "worker", "bench.taskiq_app:broker", "--workers", str(n),
        "--log-level", "WARNING"]]),
    Peer("dramatiq_app", "dramatiq + Results", "dramatiq", PY,
         _each([PY, "-m", "bench.peer_apps.dramatiq_app"]), at_once=False),
    Peer("saq_app", "saq", "saq", PY, lambda n, _: [[
        PY, "-m", "saq", "bench.peer_apps.saq_app.settings", "--workers", str(n)]]),
    Peer("arq_app", "arq", "arq", str(ARQ_PYTHON),
         _each([str(ARQ_PYTHON), "-m", "bench.peer_apps.arq_app"])),
    Peer("celery_app", "Celery", "celery", PY, lambda n, _: [[
        PY, "-m", "celery", "-A", "bench.peer_apps.celery_app", "worker", "--concurrency",
        str(n), "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
        "--without-heartbeat"]], at_once=False),
]  # fmt: skip
_BY_KEY = {peer.key: peer for peer in PEERS}
POOL = "pool_redis"


class Workers:
    """A peer's worker processes, each the leader of a session of its own, stopped as a group."""

    def __init__(self, commands: list[list[str]], env: dict[str, str], log: Path) -> None:
        self.commands, self.env, self.log = commands, env, log
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Workers:
        with open(self.log, "ab") as out:
            for command in self.commands:
                self.procs.append(subprocess.Popen(
                    command, cwd=str(ROOT), env=self.env, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,
                ))  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(10)
            _reap_group(proc.pid)


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def _reap_group(pgid: int, limit: float = 10.0) -> None:
    """Waits for the rest of a stopped leader's group (its children), then kills what is left."""
    deadline = time.monotonic() + limit
    while _signal_group(pgid, 0):
        if time.monotonic() > deadline:
            _signal_group(pgid, signal.SIGKILL)
            deadline = time.monotonic() + limit
        time.sleep(0.05)


async def _cleanup(uid: str) -> int:
    import redis.asyncio as aioredis

    client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        keys = [key async for key in client.scan_iter(match=f"*{uid}*", count=1000)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
        return len(keys)
    finally:
        await client.aclose()


async def _drive(
    peer: Peer, args: argparse.Namespace, env: dict[str, str], count: bool = False,
    on_mark: Callable[[str, int], Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Runs the peer's producer; ``on_mark(mark, its pid)`` is awaited at each ``@mark``."""
    command = [peer.python, "-m", "bench.peer_apps.drive", peer.key, "--tasks", str(args.tasks),
               "--calls", str(args.calls), *(["--count"] if count else [])]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *command, cwd=str(ROOT), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    result: dict[str, Any] = {}

    async def converse() -> None:
        assert proc.stdin is not None and proc.stdout is not None
        while line := (await proc.stdout.readline()).decode().strip():
            if line.startswith("@") and on_mark is not None:
                await on_mark(line[1:], proc.pid)
            if line.startswith("@"):
                proc.stdin.write(b"\n")
                await proc.stdin.drain()
            elif line.startswith("{"):
                result["figures"] = json.loads(line)
        await proc.wait()

    try:
        await asyncio.wait_for(converse(), args.timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0 or "figures" not in result:
        raise RuntimeError(f"{peer.label}: producer exited {proc.returncode}")
    return dict(result["figures"])


@contextlib.asynccontextmanager
async def _peer_run(
    peer: Peer, args: argparse.Namespace, url: str, worker_url: str | None = None
) -> AsyncIterator[tuple[dict[str, str], Workers]]:
    """The peer's workers running on a queue of this run alone; yields the producer's env."""
    uid = uuid.uuid4().hex[:10]
    run_dir = tempfile.mkdtemp(prefix="rp-", dir="/tmp")
    base = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_QUEUE": f"bench-{peer.key}-{uid}",
            "BENCH_POLL": str(POLL)}  # fmt: skip
    worker_env = {**base, "BENCH_REDIS_URL": worker_url or url}
    log = Path(run_dir) / "workers.log"
    try:
        with Workers(peer.workers(2, run_dir), worker_env, log) as workers:
            yield {**base, "BENCH_REDIS_URL": url}, workers
    except Exception:
        print(f"{peer.label}: workers' log:\n{log.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        await _cleanup(uid)
        shutil.rmtree(run_dir, ignore_errors=True)


DIRECT = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


async def _timed(peer: Peer, args: argparse.Namespace) -> dict[str, Any]:
    async with _peer_run(peer, args, DIRECT) as (env, workers):
        fig = await _drive(peer, args, env)
        await asyncio.sleep(IDLE_SETTLE_S)
        return {**fig, "idle_pss_mib": idle_pss_mib(workers.procs)}


def idle_pss_mib(procs: list[subprocess.Popen[bytes]]) -> float:
    """What the peer's whole deployment costs the machine once idle after its work: the PSS
    of its worker processes and all their children (a pool's supervisor, state server and
    workers; Celery's parent and its prefork children; ...)."""
    import psutil

    from bench.memory_bench import process_memory

    total = 0.0
    for proc in procs:
        root = psutil.Process(proc.pid)
        for member in [root, *root.children(recursive=True)]:
            try:
                total += process_memory(member.pid)["pss_mib"]
            except (psutil.Error, OSError):
                pass  # gone meanwhile
    return total


async def _server_calls() -> dict[str, int]:
    import redis.asyncio as aioredis

    client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    changed = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    return {k: v for k, v in changed.items() if k not in ("info", "client|list")}


async def _counted(peer: Peer, args: argparse.Namespace) -> dict[str, Any]:
    """Commands and round trips per task, in the batch phase and the sequential phase."""
    producer, workers = await CountingProxy().start(), await CountingProxy().start()
    marks: dict[str, Any] = {}

    async def on_mark(name: str, pid: int) -> None:
        if name.endswith("-done"):
            await asyncio.sleep(0.3)  # the workers' acknowledgements after the last result
        marks[name] = (producer.snapshot(), workers.snapshot(), await _server_calls())

    try:
        async with _peer_run(
            peer, args, f"redis://127.0.0.1:{producer.port}/0",
            worker_url=f"redis://127.0.0.1:{workers.port}/0",
        ) as (env, _):  # fmt: skip
            await _drive(peer, args, env, count=True, on_mark=on_mark)
    finally:
        await producer.stop()
        await workers.stop()
    return {
        phase: _per_task(marks[phase], marks[f"{phase}-done"], tasks)
        for phase, tasks in (("batch", args.tasks), ("calls", args.calls))
    }


def _per_task(before: Any, after: Any, tasks: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for role, start, end in zip(("producer", "workers"), before[:2], after[:2], strict=True):
        names = _delta(end["commands"], start["commands"])
        out[role] = {
            "commands": sum(names.values()) / tasks,
            "round_trips": (end["round_trips"] - start["round_trips"]) / tasks,
            "by_command": _by_count(names, tasks),
        }
    out["commands"] = out["producer"]["commands"] + out["workers"]["commands"]
    out["round_trips"] = out["producer"]["round_trips"] + out["workers"]["round_trips"]
    server = _delta(after[2], before[2])
    out["server_commands"] = sum(server.values()) / tasks
    out["server_by_command"] = _by_count(server, tasks)
    return out


def _by_count(calls: dict[str, int], tasks: int) -> dict[str, float]:
    return {k: v / tasks for k, v in sorted(calls.items(), key=lambda item: -item[1])}


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "throughput_tasks_per_s": median([r["throughput_tasks_per_s"] for r in rounds]),
        "sequential_tasks_per_s": median([r["sequential_tasks_per_s"] for r in rounds]),
        "p50_ms": median([r["p50_ms"] for r in rounds]),
        "p99_ms": median([r["p99_ms"] for r in rounds]),
        "idle_pss_mib": median([r["idle_pss_mib"] for r in rounds]),
        "rounds": [{k: v for k, v in r.items() if k != "samples_ms"} for r in rounds],
    }


async def measure(
    rounds: int = 3, tasks: int = 4000, calls: int = 300, count: bool = True, timeout: float = 600
) -> dict[str, Any]:
    args = argparse.Namespace(tasks=tasks, calls=calls, timeout=timeout)
    peers, skipped = [], {}
    for peer in PEERS:
        reason = peer.missing()
        if reason is None:
            peers.append(peer)
        else:
            skipped[peer.key] = reason
            print(f"skipping {peer.label}: {reason}", flush=True)
    samples: dict[str, list[dict[str, Any]]] = {p.key: [] for p in peers}
    failures: dict[str, list[str]] = {}
    for index in range(rounds):
        for peer in peers[index % len(peers) :] + peers[: index % len(peers)]:
            try:
                fig = await _timed(peer, args)
            except Exception as exc:  # a peer's failure is reported, the others go on
                print(f"round {index + 1} {peer.label}: failed: {exc!r}", flush=True)
                failures.setdefault(peer.key, []).append(repr(exc))
                continue
            samples[peer.key].append(fig)
            print(f"round {index + 1} {peer.label}: {fig['throughput_tasks_per_s']:.0f} tasks/s "
                  f"(one by one {fig['sequential_tasks_per_s']:.0f}), p50 {fig['p50_ms']:.3f} ms",
                  flush=True)  # fmt: skip
    for key, errors in failures.items():
        if not samples[key]:
            skipped[key] = f"failed in every round: {errors[0]}"
    peers = [peer for peer in peers if samples[peer.key]]
    figures = {peer.key: {"label": peer.label, **_summary(samples[peer.key])} for peer in peers}
    if count:
        for peer in peers:
            try:
                figures[peer.key]["counted"] = await _counted(peer, args)
            except Exception as exc:
                print(f"{peer.label}: counting round failed: {exc!r}", flush=True)
                failures.setdefault(peer.key, []).append(f"counting: {exc!r}")
                continue
            batch = figures[peer.key]["counted"]["batch"]
            print(f"{peer.label}: {batch['commands']:.2f} commands, "
                  f"{batch['round_trips']:.2f} round trips per task", flush=True)  # fmt: skip
    return {
        "rounds": rounds, "tasks": tasks, "calls": calls, "poll_s": POLL,
        "peers": figures, "skipped": skipped, "failures": failures, "versions": _versions(peers),
    }  # fmt: skip


def _versions(peers: list[Peer]) -> dict[str, str]:
    out = {}
    for peer in peers:
        dist = {"pool_redis": "redis", "taskiq_redis": "taskiq-redis"}.get(peer.key, peer.package)
        probe = subprocess.run(
            [peer.python, "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
            capture_output=True, text=True,
        )  # fmt: skip
        out[peer.key] = f"{dist} {probe.stdout.strip()}"
    return out


# --------------------------------------------------------------------------- profile
async def profile(tasks: int, out: Path, rate: int = 250) -> dict[str, Any]:
    """py-spy on pool + Redis's processes during one batch of ``tasks`` tasks.

    Writes each process's collapsed stacks (``py-spy record --gil --format raw``: samples of
    the thread holding the GIL, so time in system calls is not there) under ``out``. Returns,
    per role (producer, supervisor, workers, state server): its CPU time (user + system, from
    psutil) and py-spy's samples, in µs per task over all of that role's processes, by
    package of the innermost frame, by package anywhere on the stack, and by function.
    """
    import psutil

    peer = next(p for p in PEERS if p.key == POOL)
    args = argparse.Namespace(tasks=tasks, calls=10, timeout=600)
    out.mkdir(parents=True, exist_ok=True)
    spies: dict[int, tuple[psutil.Process, subprocess.Popen[bytes], Path, float]] = {}
    cpu: dict[int, float] = {}
    wall, producer = [0.0], [0]
    py_spy = str(Path(sys.executable).with_name("py-spy"))

    def cpu_s(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return float(times.user + times.system)

    async def on_mark(name: str, pid: int) -> None:
        if name == "batch":
            producer[0] = pid
            supervisor = psutil.Process(workers.procs[0].pid)
            for proc in [psutil.Process(pid), supervisor, *supervisor.children(recursive=True)]:
                path = out / f"{proc.pid}.txt"
                spy = subprocess.Popen(
                    [py_spy, "record", "--pid", str(proc.pid), "--rate", str(rate), "--gil",
                     "--format", "raw", "--output", str(path)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                spies[proc.pid] = (proc, spy, path, 0.0)
            await asyncio.sleep(1.0)  # py-spy attached
            for key, (proc, spy, path, _) in spies.items():
                spies[key] = (proc, spy, path, cpu_s(proc))
            wall[0] = time.perf_counter()
        elif name == "batch-done":
            wall[0] = time.perf_counter() - wall[0]
            for key, (proc, spy, _, before) in spies.items():
                cpu[key] = cpu_s(proc) - before
                spy.send_signal(signal.SIGINT)
            for _, spy, _, _ in spies.values():
                spy.wait(30)

    async with _peer_run(peer, args, DIRECT) as (env, workers):
        await _drive(peer, args, env, count=True, on_mark=on_mark)
    roles: dict[str, list[tuple[Path, float]]] = {}
    for key, (_, _, path, _) in spies.items():
        text = path.read_text() if path.exists() else ""
        role = ("producer" if key == producer[0] else "supervisor" if key == workers.procs[0].pid
                else "workers" if "pool/runtime/worker.py" in text else "state server")  # fmt: skip
        roles.setdefault(role, []).append((path, cpu[key]))
    summaries = {role: _profile_summary(files, tasks, rate) for role, files in roles.items()}
    return {"wall_s": wall[0], "tasks": tasks, "rate": rate, **summaries}


def _profile_summary(files: list[tuple[Path, float]], tasks: int, rate: int) -> dict[str, Any]:
    """py-spy's shares of the role's samples, scaled to its CPU time (µs per task).

    On a busy machine a thread that holds the GIL is sampled while it waits for a core too, so
    the samples give the shares and psutil's CPU time the total.
    """
    from collections import Counter

    packages: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    under: Counter[str] = Counter()
    for path, _ in files:
        for line in path.read_text().splitlines() if path.exists() else []:
            stack, _, count = line.rpartition(" ")
            frames = [f for f in stack.split(";") if "(" in f]
            if not frames:
                continue
            samples = int(count)
            packages[_package(frames[-1])] += samples
            functions[_function(frames[-1])] += samples
            for package in {_package(f) for f in frames}:
                inclusive[package] += samples
            for function in {_function(f) for f in frames}:
                under[function] += samples
    total = sum(packages.values())
    cpu_us = sum(c for _, c in files) * 1e6 / tasks

    def top(counter: Counter[str], n: int) -> dict[str, float]:
        shown = [(k, v) for k, v in counter.most_common(n + 12) if v < total][:n]
        return {k: round(v / total * cpu_us, 1) for k, v in shown} if total else {}

    return {
        "processes": len(files),
        "cpu_us_per_task": round(cpu_us, 1),
        "samples": total,
        "self_by_package_us": top(packages, 10),
        "inclusive_by_package_us": top(inclusive, 10),
        "self_by_function_us": top(functions, 15),
        "inclusive_by_function_us": top(under, 25),
    }


def _package(frame: str) -> str:
    """py-spy names a file from its ``sys.path`` entry: ``redis/asyncio/client.py``..."""
    path = frame.rsplit("(", 1)[-1].split(":")[0]
    parts = path.split("/")
    if parts[0] in ("pool", "shared_state", "bench") and len(parts) > 2:
        return "/".join(parts[:2])
    return parts[0].removesuffix(".py")


def _function(frame: str) -> str:
    name, _, where = frame.partition(" (")
    return f"{name} [{where.split(':')[0]}]"


# --------------------------------------------------------------------------- report
def _ratio(value: float) -> str:
    return f"{value:.1f}x"


def rows(fig: dict[str, Any]) -> list[tuple[str, ...]]:
    """The section's table: one row per setup, pool's ratios against each peer."""
    peers = fig["peers"]
    pool = peers.get(POOL)
    out: list[tuple[str, ...]] = [(
        "setup (2 worker processes)", "tasks/s, sent at once", "pool / it",
        "tasks/s, one send after another", "pool / it", "p50 ms", "p99 ms",
        "its p50 / pool's", "idle PSS MiB", "commands/task (producer + workers)",
        "round trips/task", "server commands/task",
    )]  # fmt: skip
    for key, peer in peers.items():
        batch = peer.get("counted", {}).get("batch")
        counted = ("", "", "") if batch is None else (
            f"{batch['commands']:.2f} ({batch['producer']['commands']:.2f} + "
            f"{batch['workers']['commands']:.2f})",
            f"{batch['round_trips']:.2f} ({batch['producer']['round_trips']:.2f} + "
            f"{batch['workers']['round_trips']:.2f})",
            f"{batch['server_commands']:.2f}",
        )  # fmt: skip
        mine = key == POOL or pool is None
        out.append((
            peer["label"] + (f" ({fig['versions'][key]})" if key in fig["versions"] else ""),
            f"{peer['throughput_tasks_per_s']:.0f}" + ("" if _BY_KEY[key].at_once else "*"),
            "" if mine else _ratio(pool["throughput_tasks_per_s"] / peer["throughput_tasks_per_s"]),
            f"{peer['sequential_tasks_per_s']:.0f}",
            "" if mine else _ratio(pool["sequential_tasks_per_s"] / peer["sequential_tasks_per_s"]),
            f"{peer['p50_ms']:.3f}",
            f"{peer['p99_ms']:.3f}",
            "" if mine else _ratio(peer["p50_ms"] / pool["p50_ms"]),
            f"{peer['idle_pss_mib']:.1f}",
            *counted,
        ))  # fmt: skip
    return out


def verdict(fig: dict[str, Any]) -> str:
    peers = dict(fig["peers"])
    pool = peers.pop(POOL, None)
    if pool is None or not peers:
        return "pool + Redis or every peer was skipped: no ratio."
    fast = max(peers.values(), key=lambda p: p["throughput_tasks_per_s"])
    steady = max(peers.values(), key=lambda p: p["sequential_tasks_per_s"])
    quick = min(peers.values(), key=lambda p: p["p50_ms"])
    return (
        f"Best peer by throughput: {fast['label']}; pool + Redis / it = "
        f"{pool['throughput_tasks_per_s'] / fast['throughput_tasks_per_s']:.2f}x (goal: 3x). "
        f"One send after another: {steady['label']}; pool + Redis / it = "
        f"{pool['sequential_tasks_per_s'] / steady['sequential_tasks_per_s']:.2f}x. "
        f"Best peer by round trip p50: {quick['label']}; its p50 / pool's = "
        f"{quick['p50_ms'] / pool['p50_ms']:.2f}x."
    )


def commands_table(fig: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per peer, the commands its clients send per task in the batch phase, by name."""
    out: list[tuple[str, ...]] = [("setup", "producer sends per task", "workers send per task",
                                   "sequential phase: commands, round trips per task")]  # fmt: skip
    for peer in fig["peers"].values():
        counted = peer.get("counted")
        if not counted:
            continue
        batch, calls = counted["batch"], counted["calls"]
        out.append((
            peer["label"], _names(batch["producer"]["by_command"]),
            _names(batch["workers"]["by_command"]),
            f"{calls['commands']:.2f}, {calls['round_trips']:.2f}",
        ))  # fmt: skip
    return out


def _names(by_command: dict[str, float], top: int = 6) -> str:
    return ", ".join(f"{name} {n:.2f}" for name, n in list(by_command.items())[:top] if n >= 0.01)


def print_report(fig: dict[str, Any]) -> None:
    for table in (rows(fig), commands_table(fig)):
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        print()
    print(verdict(fig))
    for key, reason in fig["skipped"].items():
        print(f"skipped {key}: {reason}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_peers", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=4000, help="tasks per throughput round")
    parser.add_argument("--calls", type=int, default=300, help="sequential round trips per round")
    parser.add_argument("--no-count", action="store_true", help="skip the counting rounds")
    parser.add_argument("--json", type=Path, help="also write the figures there")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR",
        help="instead: py-spy on pool + Redis's producer and workers for one batch of --tasks",
    )  # fmt: skip
    args = parser.parse_args()
    if args.profile:
        print(json.dumps(asyncio.run(profile(args.tasks, args.profile)), indent=1))
        return
    fig = asyncio.run(measure(args.rounds, args.tasks, args.calls, count=not args.no_count))
    print_report(fig)
    if args.json:
        args.json.write_text(json.dumps(fig, indent=1))


if __name__ == "__main__":
    main()
