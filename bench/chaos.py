"""Chaos: send tasks while a random worker is SIGKILLed every 0.5 s; count what was lost.

A task is *lost* when no result ever comes back; *run twice* when its own counter in the
shared state ended above 1 (at-least-once delivery after a crash); *gave up* when it was on
a worker that died three times and the pool answered with an error result instead.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from typing import Any

from bench.pool_run import BenchPool


async def _killer(pool: BenchPool, stop: asyncio.Event, every: float) -> int:
    kills = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass
        if stop.is_set():
            break
        ready = [w["pid"] for w in (await pool.stats())["workers"] if w["state"] == "ready"]
        if ready:
            try:
                os.kill(random.choice(ready), signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
    return kills


async def run_once(total: int, chaos: bool, workers: int = 2) -> dict[str, Any]:
    from bench.apps import broker, chaos_run
    from pool.runtime.rundir import RunDir
    from shared_state import connect_state

    async with BenchPool(workers) as pool:
        broker.run_dir = pool.run_dir
        await broker.startup()
        stop = asyncio.Event()
        killer = asyncio.create_task(_killer(pool, stop, 0.5)) if chaos else None
        start = time.perf_counter()
        lost = gave_up = 0
        try:
            for offset in range(0, total, 1000):
                handles = [await chaos_run.kiq(i) for i in range(offset, min(total, offset + 1000))]
                for handle in handles:
                    try:
                        result = await handle.wait_result(timeout=120)
                    except Exception:
                        lost += 1
                        continue
                    if result.is_err:
                        gave_up += 1
            elapsed = time.perf_counter() - start
        finally:
            stop.set()
            kills = await killer if killer is not None else 0
            await broker.shutdown()
        rd = RunDir.at(pool.run_dir)
        state = connect_state(
            str(rd.state_socket), rd.authkey_file.read_bytes(), str(rd.state_versions)
        )
        runs = [state.get_value(f"chaos:{i}", 0) for i in range(total)]
    return {
        "tasks": total,
        "kills": kills,
        "lost": lost,
        "gave_up": gave_up,
        "never_ran": sum(1 for r in runs if r == 0),
        "ran_twice_or_more": sum(1 for r in runs if r > 1),
        "throughput_tasks_per_s": total / elapsed,
    }


async def measure(total: int = 20_000) -> dict[str, Any]:
    calm = await run_once(total, chaos=False)
    storm = await run_once(total, chaos=True)
    storm["throughput_vs_calm"] = storm["throughput_tasks_per_s"] / calm["throughput_tasks_per_s"]
    return {"calm": calm, "chaos": storm}


if __name__ == "__main__":
    import json

    print(json.dumps(asyncio.run(measure()), indent=1))
