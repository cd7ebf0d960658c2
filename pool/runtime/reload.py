"""Re-import the user's code for a rolling restart (SIGHUP).

Forked workers start from the supervisor's memory, so the supervisor itself must hold the
new code: it forgets the modules that are the user's (not the standard library, not an
installed package, not pool itself) and imports the app again.
"""

from __future__ import annotations

import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

_OURS = ("pool", "shared_state")


def _library_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    roots = {
        paths[name] for name in ("stdlib", "platstdlib", "purelib", "platlib") if name in paths
    }
    roots.update({sys.prefix, sys.base_prefix, sys.exec_prefix})
    return [Path(root).resolve() for root in roots]


def is_user_module(name: str, module: ModuleType) -> bool:
    if name.split(".")[0] in _OURS or name == "__main__":
        return False
    file = getattr(module, "__file__", None)
    if not file:
        return False
    path = Path(file).resolve()
    return not any(path.is_relative_to(root) for root in _library_roots())


def reload_app(app: str, task_modules: Sequence[str] = ()) -> Any:
    """Import ``app`` afresh with all user modules; on failure the old modules stay."""
    from pool.runtime.app import load_broker

    saved = {name: mod for name, mod in list(sys.modules.items()) if is_user_module(name, mod)}
    for name in saved:
        del sys.modules[name]
    try:
        return load_broker(app, task_modules)
    except BaseException:
        sys.modules.update(saved)
        raise
