"""Idle memory of a pool: PSS of the supervisor, the state server and 2 workers.

PSS (proportional set size) counts a page shared by n processes as 1/n in each, so the sum
over the pool's processes is what the pool costs the machine. Forked workers share the
supervisor's pages until one of them writes to a page. File-backed pages (the interpreter,
extension modules) are also shared with every other process that maps them, so the figures
move a little with what else runs on the machine; USS (the pages of one process alone) and
the per-kind split (anonymous memory, files) say where the memory is.

"Bare" rows are single interpreters started beside the pool, for scale: ``pass`` is what a
Python process costs at all, ``import taskiq`` what taskiq's own imports cost one process
(aiohttp, pydantic; FastAPI too when it is installed, through taskiq_dependencies).

Where the memory goes: ``import_layers`` adds the supervisor's imports one layer at a time
to a fresh interpreter, and ``fork_floor`` is what a child forked from those imports costs
when it does nothing, or runs an idle event loop (the least a worker or the state server
can cost: every page either process writes after the fork exists twice).

Measured with this script and not kept (Python 3.11, no FastAPI, total 66.7 MiB): forking
the state server before the app is imported, 69-72 MiB (the supervisor's later imports
write to the early pages, which become the server's own: its USS rose from 8.7 to 11.2
MiB); ``gc.collect()`` and ``malloc_trim(0)`` before each fork, 66.9-68.1;
``MALLOC_ARENA_MAX=1`` or ``2``, 66.3. Python 3.12 and 3.13 give 66.3 and 68.0.

Reproduce: ``python -m bench.memory_bench`` (``--python PATH`` measures another
interpreter's environment, e.g. a venv with ``pip install taskiq-pool`` only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil

from bench.pool_run import ROOT, stop

MIB = 2**20
SETTLE_S = 3.0  # after the workers are ready: the pool is idle, its pages settled
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def smaps_split(pid: int) -> dict[str, float]:
    """PSS of one process by kind of mapping, MiB: anonymous (heap, arenas), files."""
    split = {"anon": 0.0, "files": 0.0}
    kind = "anon"
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            field, _, rest = line.partition(" ")
            if not field.endswith(":"):  # a mapping's header: address perms offset dev inode path
                parts = line.split()
                path = parts[5] if len(parts) > 5 else ""
                kind = "files" if path.startswith("/") else "anon"
            elif field == "Pss:":
                split[kind] += int(rest.split()[0]) / 1024
    return split


def process_memory(pid: int) -> dict[str, float]:
    info = psutil.Process(pid).memory_full_info()
    return {
        "pss_mib": info.pss / MIB,
        "uss_mib": info.uss / MIB,
        "rss_mib": info.rss / MIB,
        **{f"pss_{kind}_mib": mib for kind, mib in smaps_split(pid).items()},
    }


def stats(run_dir: str) -> dict[str, Any] | None:
    """The pool's stats, read by a short-lived ``pool stats`` process, so that this one
    maps none of taskiq's files (it would share their pages, and lower the pool's PSS)."""
    argv = [sys.executable, "-m", "pool", "stats", "--json", "--run-dir", run_dir]
    done = subprocess.run(argv, capture_output=True, cwd=str(ROOT), env=ENV)
    return json.loads(done.stdout) if done.returncode == 0 else None


def pool_idle(workers: int = 2, app: str = "bench.apps:broker") -> dict[str, Any]:
    """Each process of an idle pool, and their sum."""
    run_dir = tempfile.mkdtemp(prefix="pb-", dir="/tmp")
    argv = [sys.executable, "-m", "pool", "run", app, "--workers", str(workers),
            "--run-dir", run_dir, "--log-level", "WARNING"]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=str(ROOT), env=ENV)
    try:
        worker_pids = _ready_workers(proc, run_dir, workers)
        time.sleep(SETTLE_S)
        others = [c.pid for c in psutil.Process(proc.pid).children() if c.pid not in worker_pids]
        roles = [("supervisor", proc.pid)]
        roles += [("state server", pid) for pid in others]
        roles += [(f"worker {i}", pid) for i, pid in enumerate(worker_pids)]
        rows = {name: process_memory(pid) for name, pid in roles}
    finally:
        stop(proc)
        shutil.rmtree(run_dir, ignore_errors=True)
    total = {key: sum(row[key] for row in rows.values()) for key in next(iter(rows.values()))}
    return {"processes": rows, "total": total}


def _ready_workers(proc: subprocess.Popen[bytes], run_dir: str, workers: int) -> list[int]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pool exited with {proc.returncode}")
        fig = stats(run_dir)
        ready = [w["pid"] for w in (fig or {}).get("workers", []) if w["state"] == "ready"]
        if len(ready) == workers:
            return ready
        time.sleep(0.1)
    raise RuntimeError("pool not ready in 60 s")


def bare(code: str) -> dict[str, float]:
    """One fresh interpreter that runs ``code`` and then sleeps."""
    proc = subprocess.Popen(
        [sys.executable, "-c", f"{code}\nimport time\ntime.sleep(60)"], cwd=str(ROOT)
    )
    try:
        time.sleep(SETTLE_S)
        return process_memory(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def have_fastapi() -> bool:
    check = "import importlib.util, sys; sys.exit(importlib.util.find_spec('fastapi') is None)"
    return subprocess.run([sys.executable, "-c", check]).returncode == 0


# What the supervisor imports, layer by layer, in the order one layer needs the next.
LAYERS = (
    ("asyncio", "import asyncio"),
    ("pydantic", "import pydantic"),
    ("aiohttp (taskiq.middlewares)", "import aiohttp"),
    ("fastapi (taskiq_dependencies)", "import importlib.util\n"
     "if importlib.util.find_spec('fastapi'): import fastapi"),
    ("the rest of taskiq", "import taskiq"),
    ("the app (PoolBroker, tasks)", "import bench.apps"),
    ("pool's runtime (cli, supervisor, ...)",
     "import pool.ops.cli, pool.runtime.runner, pool.runtime.supervisor, uvloop"),
)  # fmt: skip

_LAYER_SCRIPT = """
import json, sys
def rollup():
    out = {}
    for line in open("/proc/self/smaps_rollup"):
        key, _, rest = line.partition(":")
        if key in ("Pss", "Anonymous"):
            out[key] = int(rest.split()[0]) / 1024
    return out
rows = [("interpreter", rollup())]
for name, code in json.loads(sys.argv[1]):
    exec(code, {})
    rows.append((name, rollup()))
print(json.dumps(rows))
"""


def import_layers() -> list[dict[str, Any]]:
    """MiB each layer adds to one fresh process (anonymous memory: its own heap and arenas;
    PSS also counts its files, shared with other processes)."""
    argv = [sys.executable, "-c", _LAYER_SCRIPT, json.dumps(LAYERS)]
    done = subprocess.run(argv, capture_output=True, check=True, cwd=str(ROOT), env=ENV)
    rows, prev = [], {"Pss": 0.0, "Anonymous": 0.0}
    for name, now in json.loads(done.stdout):
        rows.append({
            "layer": name,
            "anon_mib": now["Anonymous"] - prev["Anonymous"],
            "pss_mib": now["Pss"] - prev["Pss"],
        })  # fmt: skip
        prev = now
    return rows


_FORK_SCRIPT = """
import asyncio, gc, os, sys, time
import psutil, uvloop
import bench.apps, pool.ops.cli, pool.runtime.runner, pool.runtime.supervisor
gc.freeze()
kids = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        if sys.argv[1] == "loop":
            uvloop.new_event_loop().run_until_complete(asyncio.sleep(30))
        else:
            time.sleep(30)
        os._exit(0)
    kids.append(pid)
time.sleep(float(sys.argv[2]))
print(sum(psutil.Process(pid).memory_full_info().uss for pid in kids) / 2 / 2**20)
for pid in kids:
    os.kill(pid, 9)
"""


def fork_floor(what: str) -> float:
    """USS of a child forked from a process with the supervisor's imports, that does
    nothing (``sleep``) or runs an idle event loop (``loop``): the least a worker costs."""
    argv = [sys.executable, "-c", _FORK_SCRIPT, what, str(SETTLE_S)]
    done = subprocess.run(argv, capture_output=True, check=True, cwd=str(ROOT), env=ENV)
    return float(done.stdout)


def measure() -> dict[str, Any]:
    pool = pool_idle()
    layers = import_layers()
    children = {what: fork_floor(what) for what in ("sleep", "loop")}
    # the supervisor is the process with every import; the state server and the workers
    # are children forked from it, each at least an idle event loop
    least = sum(row["pss_mib"] for row in layers) + (len(pool["processes"]) - 1) * children["loop"]
    return {
        "python": sys.executable,
        "python_version": sys.version.split()[0],
        "fastapi_installed": have_fastapi(),
        "pool": pool,
        "bare": {code: bare(code) for code in ("pass", "import taskiq")},
        "layers": layers,
        "forked_child_uss_mib": children,
        "least_pss_mib": least,
    }


def measure_in(python: str) -> dict[str, Any]:
    """The same figures under another interpreter's environment (e.g. a plain install)."""
    argv = [python, "-m", "bench.memory_bench", "--json"]
    done = subprocess.run(argv, capture_output=True, check=True, cwd=str(ROOT), env=ENV)
    figures: dict[str, Any] = json.loads(done.stdout)
    return figures


def show(fig: dict[str, Any]) -> str:
    head = f"{'process':14s} {'PSS':>6s} {'anon':>6s} {'files':>6s} {'USS':>6s} {'RSS':>6s}"
    lines = [
        f"{fig['python']} (Python {fig['python_version']}, FastAPI installed: "
        f"{fig['fastapi_installed']})",
        head,
    ]
    rows = {**fig["pool"]["processes"], "TOTAL": fig["pool"]["total"]}
    rows.update({f"bare: {k}": v for k, v in fig["bare"].items()})
    for name, row in rows.items():
        lines.append(
            f"{name[:14]:14s} {row['pss_mib']:6.1f} {row['pss_anon_mib']:6.1f} "
            f"{row['pss_files_mib']:6.1f} {row['uss_mib']:6.1f} {row['rss_mib']:6.1f}"
        )
    lines.append("(MiB; anon and files split the PSS)")
    lines.append("imports, in one fresh process:            anon MiB  PSS MiB")
    for row in fig["layers"]:
        lines.append(f"  {row['layer'][:40]:40s} {row['anon_mib']:6.1f} {row['pss_mib']:8.1f}")
    floor = fig["forked_child_uss_mib"]
    lines.append(
        f"a child forked from the supervisor's imports: USS {floor['sleep']:.1f} MiB asleep, "
        f"{floor['loop']:.1f} MiB with an idle event loop"
    )
    lines.append(
        f"the least these imports allow (one process with all of them, the others forked "
        f"idle children): {fig['least_pss_mib']:.1f} MiB"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_bench", description=__doc__)
    parser.add_argument("--python", help="measure under this interpreter instead")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    fig = measure_in(args.python) if args.python else measure()
    print(json.dumps(fig, indent=1) if args.json else show(fig))


if __name__ == "__main__":
    main()
