"""Showing the supervisor's stats to a person: a rich table, once or live."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

WIDTH = 80  # the table fits a terminal of 80 columns, one line per worker


def _mib(value: int) -> str:
    return f"{value / (1024 * 1024):.0f}"


def _age(seconds: float) -> str:
    """45s, 12m, 5h, 3d: an uptime in at most four characters."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (10 if unit == "m" else 1):
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


COLUMNS = ("id", "pid", "state", "up", "done", "failed", "running", "RSS MiB", "CPU%", "restarts")


def table(stats: dict[str, Any]) -> Any:
    from rich import box
    from rich.table import Table

    totals = stats["totals"]
    rate = stats.get("throughput") or {}
    caption = (
        f"supervisor pid {stats['pid']}, up {_age(stats['uptime_s'])}, "
        f"target {stats['target_workers']}, queued {totals['queued']}, "
        f"state keys {stats['state']['keys']}\n"
        f"{rate.get('last_10s', 0.0):.1f} tasks/s (10 s), "
        f"{rate.get('last_1m', 0.0):.1f} tasks/s (1 min)"
    )
    view = Table(title="pool", caption=caption, box=box.SIMPLE_HEAD, padding=(0, 0))
    for name in COLUMNS:
        view.add_column(name, justify="left" if name == "state" else "right", no_wrap=True)
    for row in stats["workers"]:
        view.add_row(
            str(row["id"]),
            str(row["pid"]),
            "replacing" if row.get("recycling") else row["state"],
            _age(row["uptime_s"]),
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

    Console(width=min(Console().width, WIDTH) if Console().is_terminal else WIDTH).print(
        table(stats)
    )


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
