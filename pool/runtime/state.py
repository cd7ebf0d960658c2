"""Which shared state a pool uses: its own state server (default) or Redis (``--state``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pool.runtime.rundir import RunDir
    from shared_state import TaskiqState


DEFAULT_PREFIX = "pool:state"


def open_state(
    state_url: str | None, run_dir: RunDir, authkey: bytes, prefix: str = DEFAULT_PREFIX
) -> TaskiqState:
    """A client of the pool's shared state, for the supervisor or a worker."""
    if state_url:
        from pool.redis import RedisState

        return RedisState(state_url, prefix=prefix)
    from shared_state import connect_state

    return connect_state(str(run_dir.state_socket), authkey, str(run_dir.state_versions))
