"""The previous release of pool (before it was built on taskiq) measured beside this one.

A git worktree of ``RELEASE`` (the last commit of pool's own taskiq-like API) is made in a
temporary directory; both trees are then measured the same way, in the same run: the
embedded broker's throughput and round trip (each tree's own ``bench.pool_bench``), the time
of ``import pool`` in a fresh interpreter, and the RSS of an idle worker and the supervisor.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.pool_run import ROOT, stop

RELEASE = "c42bd18"  # "Review: drop dead code ...", the last release of the old API
E2E_ROUNDS = 3


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}


def import_time_ms(tree: Path, rounds: int = 7) -> float:
    """Median wall time of ``import pool`` (and of the name a producer needs) in a new
    interpreter, minus the interpreter's own start-up."""

    def timed(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=tree, env=_env(tree), check=True)
        return time.perf_counter() - start

    bare = statistics.median(timed("pass") for _ in range(rounds))
    full = statistics.median(timed("import pool; pool.PoolBroker") for _ in range(rounds))
    return (full - bare) * 1000


def memory_mib(tree: Path, workers: int = 2) -> dict[str, float]:
    """RSS of an idle pool started from ``tree`` with the benchmark app."""
    run_dir = tempfile.mkdtemp(prefix="pr-", dir="/tmp")
    args = [sys.executable, "-m", "pool", "run", "bench.apps:broker", "--workers",
            str(workers), "--run-dir", run_dir, "--log-level", "WARNING"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=tree, env=_env(tree))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = subprocess.run(
                [sys.executable, "-m", "pool", "stats", "--json", "--run-dir", run_dir],
                cwd=tree, env=_env(tree), capture_output=True, text=True,
            )  # fmt: skip
            if done.returncode == 0:
                stats = json.loads(done.stdout)
                if sum(w["state"] == "ready" for w in stats["workers"]) == workers:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"the pool of {tree} did not start")
        time.sleep(1.0)  # idle: let start-up garbage settle
        supervisor = psutil.Process(proc.pid)
        pids = {w["pid"] for w in stats["workers"]}
        worker_rss = [psutil.Process(pid).memory_info().rss for pid in pids]
        return {
            "idle_worker_rss_mib": statistics.median(worker_rss) / 2**20,
            "supervisor_rss_mib": supervisor.memory_info().rss / 2**20,
        }
    finally:
        stop(proc)
        shutil.rmtree(run_dir, ignore_errors=True)


def end_to_end(tree: Path, total: int, calls: int) -> dict[str, Any]:
    code = (
        "import asyncio, json; from bench import pool_bench; "
        f"print(json.dumps(asyncio.run(pool_bench.measure(2, {total}, {calls}))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=_env(tree), capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    keys = ("throughput_tasks_per_s", "p50_ms", "p99_ms", "cpu_us_per_task")
    return {k: figures[k] for k in keys if k in figures}


def measure(total: int = 20_000, calls: int = 1000) -> dict[str, Any]:
    """Both trees, measured alternately: the release first, then this tree, per figure
    (``E2E_ROUNDS`` interleaved rounds of the end-to-end figures, medians)."""
    release = Path(tempfile.mkdtemp(prefix="pool-release-", dir="/tmp"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", "-f", str(release), RELEASE],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    try:
        trees = {"release": release, "current": ROOT}
        results: dict[str, dict[str, Any]] = {name: {} for name in trees}
        for name, tree in trees.items():
            results[name]["import_ms"] = import_time_ms(tree)
        for name, tree in trees.items():
            results[name].update(memory_mib(tree))
        # the end-to-end figures move most with the load of a shared machine: interleaved
        # rounds (release, this tree, release, ...), medians
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        for _ in range(E2E_ROUNDS):
            for name, tree in trees.items():
                rounds[name].append(end_to_end(tree, total, calls))
        for name, figures in rounds.items():
            for key in ("throughput_tasks_per_s", "p50_ms", "p99_ms"):
                results[name][key] = statistics.median(f[key] for f in figures)
            results[name]["rounds"] = figures
        results["release_commit"] = {"commit": RELEASE}
        return results
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(release)], cwd=ROOT,
            capture_output=True,
        )  # fmt: skip
        shutil.rmtree(release, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1))
