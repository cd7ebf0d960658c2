"""``make bench``: run every measurement in one go and write ``bench/results.md``.

Figures are medians from this machine at the time of the run; compare ratios, not
absolute numbers, since the machine is shared.
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


def render(results: dict[str, Any]) -> str:
    pool = results["pool"]
    ours, manager = results["state"]["pool_state"], results["state"]["manager_dict"]
    worker = pool["state_in_worker"]
    state_rows: list[tuple[str, ...]] = [("operation", "pool state µs", "Manager dict µs", "ratio")]
    for key, label in (
        ("get_unchanged_us", "get, unchanged int"),
        ("get_unchanged_dict_us", "get, unchanged dict"),
        ("set_us", "set"),
        ("incr_us", "incr (Manager: get+set under a Manager lock)"),
    ):
        state_rows.append(
            (label, f"{ours[key]:.2f}", f"{manager[key]:.2f}", f"{manager[key] / ours[key]:.1f}x")
        )
    return (
        "\n\n".join(
            [
                "# Benchmark results",
                f"{results['when']} on {results['machine']}. Reproduce with `make bench`.",
                "## pool + PoolBroker (2 workers, no-op tasks)",
                _table(
                    [
                        ("figure", "value"),
                        (
                            f"throughput, {pool['tasks']} tasks in batches of 1,000",
                            f"{pool['throughput_tasks_per_s']:.0f} tasks/s",
                        ),
                        ("round trip p50 (kiq + wait_result)", f"{pool['p50_ms']:.3f} ms"),
                        ("round trip p99", f"{pool['p99_ms']:.3f} ms"),
                    ]
                ),
                "## Shared state vs a multiprocess Manager dict proxy (median per operation)",
                _table(state_rows),
                "Timed from inside a pool worker: "
                + ", ".join(f"{k} {v:.2f}" for k, v in worker.items()),
            ]
        )
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=HERE / "results.md")
    args = parser.parse_args()

    from bench import pool_bench, state_bench

    results = {
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "pool": asyncio.run(pool_bench.measure(2, args.tasks, args.calls)),
        "state": state_bench.run(),
    }
    args.out.write_text(render(results))
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
