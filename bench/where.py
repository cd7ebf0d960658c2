"""Where the CPU of pool's embedded path goes, by process and by package, with ``perf``.

``python -m bench.where [--tasks N] [--round-trips]`` (Python 3.12 or later, and ``perf``): a
pool of ``bench.apps`` with 2 workers runs a throughput batch as in ``make bench`` (or, with
``--round-trips``, ``kiq`` and ``wait_result`` one task at a time), while ``perf record``
samples the producer (this process), the supervisor and each worker. Python 3.12's perf
trampolines name the Python function on every sample's native stack, so each sample
goes to the innermost Python function, whatever C code it was in: the Rust of pydantic-core
counts for the function that called it, a system call for the function that made it. Each
share is then scaled to the process's CPU time (psutil's user + system) per task.

Why not py-spy: on this machine it put 8-14% of a worker's samples on
``asyncio.current_task``, whose two calls per task cost 0.5 µs of the worker's 50 (measured
inside a worker); it overweights functions that make a system call. perf does not.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.pool_bench import CpuMeter, round_trips, throughput, warm_pool

_ROOT = str(Path(__file__).resolve().parent.parent)
_PY_FRAME = re.compile(r"py::([^:\s]+):(\S+)")
_NO_PYTHON = "no Python frame (the event loop's C, the kernel)"


@functools.cache
def package_of(path: str) -> str:
    """``/x/site-packages/taskiq/receiver/receiver.py`` -> ``taskiq``; pool's own modules by
    subpackage (``pool/runtime``); the standard library by module (``asyncio``)."""
    if path.startswith("<frozen"):
        return "stdlib"
    if path.startswith("<"):
        return "generated code (pool's frame codecs, dataclasses' __init__)"
    parts = Path(path).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return parts[parts.index(marker) + 1].removesuffix(".py")
    if path.startswith(_ROOT):
        inside = Path(path).relative_to(_ROOT).parts
        return "/".join(inside[:2]) if len(inside) > 2 else inside[0]
    stdlib = [i for i, part in enumerate(parts) if re.fullmatch(r"python3\.\d+", part)]
    if stdlib and len(parts) > stdlib[-1] + 1:
        return "stdlib " + parts[stdlib[-1] + 1].removesuffix(".py")
    return path


def attribute(script_output: str) -> Counter[tuple[str, str]]:
    """Samples per (package, function) of the innermost Python frame, from ``perf script``."""
    counts: Counter[tuple[str, str]] = Counter()
    for sample in script_output.split("\n\n"):
        if not sample.strip():
            continue
        match = _PY_FRAME.search(sample)
        if match is None:
            counts[(_NO_PYTHON, "")] += 1
        else:
            function, path = match.groups()
            counts[(package_of(path), function)] += 1
    return counts


def _share(
    counts: Counter[tuple[str, str]], cpu_us: float, by_package: bool
) -> list[tuple[str, float]]:
    total = sum(counts.values())
    merged: Counter[str] = Counter()
    for (package, function), n in counts.items():
        merged[package if by_package else f"{function} [{package}]"] += n
    return [(name, n / total * cpu_us) for name, n in merged.most_common()] if total else []


def _record(pid: int, rate: int, data: Path) -> subprocess.Popen[bytes]:
    """``perf record`` of one process until SIGINT; DWARF unwinding (CPython is built
    without frame pointers) reaches the trampoline that names the Python function."""
    command = ["perf", "record", "-F", str(rate), "--call-graph", "dwarf,8192"]
    command += ["-p", str(pid), "-o", str(data)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def profile(tasks: int, rate: int, out: Path, one_by_one: bool = False) -> dict[str, Any]:
    """Per process: CPU µs per task, and how it splits by package and by function."""
    sys.activate_stack_trampoline("perf")  # type: ignore[attr-defined]
    from bench.apps import broker, noop

    async with warm_pool(2, env={"PYTHONPERFSUPPORT": "1"}) as pool:
        assert pool.proc is not None
        stats = await pool.stats()
        workers = [w["pid"] for w in stats["workers"]]
        roles = {"producer": os.getpid(), "supervisor": pool.proc.pid}
        roles.update({f"worker {i}": pid for i, pid in enumerate(workers)})
        recorders = {role: _record(pid, rate, out / f"{role}.data") for role, pid in roles.items()}
        await asyncio.sleep(1.0)  # perf attached
        meter = CpuMeter(pool.proc.pid, workers)
        others = [proc.pid for proc in meter.procs["other children"]]  # the state server
        if one_by_one:
            started = time.perf_counter()
            p50_ms = (await round_trips(noop, tasks))["p50_ms"]
            tasks_per_s = tasks / (time.perf_counter() - started)
        else:
            tasks_per_s, p50_ms = await throughput(broker, noop, tasks), None
        cpu = meter.per_task_us(tasks)
        for recorder in recorders.values():
            recorder.send_signal(signal.SIGINT)
        for recorder in recorders.values():
            recorder.wait(60)
    # a forked worker's functions from before the fork are in the supervisor's map file
    supervisor_map = Path(f"/tmp/perf-{roles['supervisor']}.map")
    result: dict[str, Any] = {"tasks": tasks, "tasks_per_s": tasks_per_s, "p50_ms": p50_ms}
    result["processes"] = {}
    for role, pid in roles.items():
        own_map = Path(f"/tmp/perf-{pid}.map")
        if role.startswith("worker") and supervisor_map.exists():
            with own_map.open("a") as joined:
                joined.write(supervisor_map.read_text())
        script = subprocess.run(
            ["perf", "script", "-i", str(out / f"{role}.data"), "-F", "ip,sym", "--no-inline"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        counts = attribute(script)
        result["processes"][role] = {
            "cpu_us_per_task": cpu[role],
            "samples": sum(counts.values()),
            "by_package_us": _share(counts, cpu[role], by_package=True),
            "by_function_us": _share(counts, cpu[role], by_package=False)[:25],
        }
    for pid in [*roles.values(), *others]:
        Path(f"/tmp/perf-{pid}.map").unlink(missing_ok=True)
    return result


def _side(package: str) -> str:
    """Whose code a package is: pool's, taskiq's, pydantic's, the standard library's, ..."""
    if package.startswith(("pool", "shared_state", "generated")):
        return "pool"
    if package.startswith("taskiq"):
        return "taskiq"
    if package.startswith("pydantic"):
        return "pydantic"
    if package.startswith("stdlib"):
        return "stdlib"
    if package == "bench":
        return "bench"
    return "outside Python" if package == _NO_PYTHON else "other"


SIDES = ("pool", "taskiq", "pydantic", "stdlib", "bench", "outside Python", "other")


def summary(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per process: its CPU µs per task and how much of it is whose code."""
    rows: list[tuple[str, ...]] = [("process", "µs per task", *SIDES)]
    for role, fig in result["processes"].items():
        sides: Counter[str] = Counter()
        for package, us in fig["by_package_us"]:
            sides[_side(package)] += us
        rows.append((role, f"{fig['cpu_us_per_task']:.1f}", *(f"{sides[s]:.1f}" for s in SIDES)))
    return rows


def report(result: dict[str, Any]) -> str:
    lines = [
        f"# Where the CPU of the embedded path goes ({result['tasks']} no-op tasks, "
        + (
            f"one at a time: round trip p50 {result['p50_ms']:.3f} ms under perf)"
            if result["p50_ms"] is not None
            else f"in batches of 1,000: {result['tasks_per_s']:.0f} tasks/s under perf)"
        ),
        "",
        "CPU µs per task of each process, split by the package of the innermost Python "
        "function of each `perf` sample (C and kernel time count for the Python function "
        "that called them). *stdlib* is mostly asyncio, *bench* the task and the producer's "
        "loop. Reproduce: `make profile` (`python -m bench.where`, Python 3.12+ and perf).",
        "",
    ]
    head, *rows = summary(result)
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    for role, fig in result["processes"].items():
        lines += [
            "",
            f"## {role}: {fig['cpu_us_per_task']:.1f} µs per task ({fig['samples']} samples)",
            "",
        ]
        lines += ["| package | µs per task |", "|---|---|"]
        lines += [f"| {name} | {us:.1f} |" for name, us in fig["by_package_us"] if us >= 0.1]
        lines += ["", "| function | µs per task |", "|---|---|"]
        lines += [f"| `{name}` | {us:.2f} |" for name, us in fig["by_function_us"][:15]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, help="default: 100,000, or 5,000 one at a time")
    parser.add_argument("--rate", type=int, default=997, help="samples per second (perf -F)")
    parser.add_argument(
        "--round-trips", action="store_true", help="one task at a time (default: batches)"
    )
    parser.add_argument("--out", type=Path, help="write the report (markdown) here too")
    args = parser.parse_args()
    if sys.version_info < (3, 12):
        print("bench.where needs Python 3.12 or later (perf trampolines)", file=sys.stderr)
        return 2
    if shutil.which("perf") is None:
        print("bench.where needs perf (Debian: linux-perf)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pool-where-") as tmp:
        tasks = args.tasks if args.tasks is not None else (5_000 if args.round_trips else 100_000)
        text = report(asyncio.run(profile(tasks, args.rate, Path(tmp), args.round_trips)))
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
