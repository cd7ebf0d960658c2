"""Showing the supervisor's stats to a person: a rich table, once or live."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any


def _mib(value: int) -> str:
    return f"{value / (1024 * 1024):.1f} MiB"


def table(stats: dict[str, Any]) -> Any:
    from rich.table import Table

    totals = stats["totals"]
    rate = stats.get("throughput") or {}
    caption = (
        f"supervisor pid {stats['pid']} · up {stats['uptime_s']:.0f} s · "
        f"target {stats['target_workers']} worker(s) · queued {totals['queued']} · "
        f"state keys {stats['state']['keys']}\n"
        f"throughput {rate.get('last_10s', 0.0):.1f} tasks/s (10 s) · "
        f"{rate.get('last_1m', 0.0):.1f} tasks/s (1 min)"
    )
    view = Table(title="pool", caption=caption)
    for name in (
        "id",
        "pid",
        "state",
        "uptime",
        "done",
        "failed",
        "in flight",
        "RSS",
        "CPU%",
        "restarts",
    ):
        view.add_column(name, justify="left" if name == "state" else "right")
    for row in stats["workers"]:
        view.add_row(
            str(row["id"]),
            str(row["pid"]),
            row["state"] + (" (replacing)" if row.get("recycling") else ""),
            f"{row['uptime_s']:.0f} s",
            str(row["tasks_done"]),
            str(row["tasks_failed"]),
            str(row["in_flight"]),
            _mib(row["rss_bytes"]),
            f"{row['cpu_percent']:.0f}",
            str(row["restarts"]),
        )
    view.add_section()
    view.add_row(
        "total",
        "",
        "",
        "",
        str(totals["tasks_done"]),
        str(totals["tasks_failed"]),
        str(totals["in_flight"]),
        "",
        "",
        str(totals["restarts"]),
    )
    return view


def render(stats: dict[str, Any]) -> None:
    from rich.console import Console

    Console().print(table(stats))


def watch(fetch: Callable[[], dict[str, Any]], as_json: bool = False) -> int:
    """Refresh every second until Ctrl+C."""
    from rich.live import Live

    try:
        if as_json:
            while True:
                print(json.dumps(fetch()), flush=True)
                time.sleep(1)
        with Live(table(fetch()), auto_refresh=False) as live:
            while True:
                time.sleep(1)
                live.update(table(fetch()), refresh=True)
    except KeyboardInterrupt:
        return 0
