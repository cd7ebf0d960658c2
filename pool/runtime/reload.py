"""Re-import the user's code for a rolling restart (SIGHUP, ``--reload``).

Forked workers start from the supervisor's memory, so the supervisor itself must hold the
new code: it forgets the modules that are the user's and imports the app again. The user's
modules are those outside the standard library and the installed packages (not pool
itself), plus every module of the app's own top-level packages, wherever they are
installed (an app deployed with ``pip install`` reloads too).
"""

from __future__ import annotations

import sys
import sysconfig
from collections.abc import Iterable, Sequence
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


def app_packages(app: str, task_modules: Iterable[str] = ()) -> set[str]:
    """The top-level packages of ``module:attr`` and of the task modules."""
    names = [app.partition(":")[0], *task_modules]
    return {name.split(".")[0] for name in names if name}


def is_user_module(name: str, module: ModuleType, packages: Iterable[str] = ()) -> bool:
    top = name.split(".")[0]
    if top in _OURS or name == "__main__":
        return False
    file = getattr(module, "__file__", None)
    if not file:
        return False
    if top in packages:
        return True
    path = Path(file).resolve()
    return not any(path.is_relative_to(root) for root in _library_roots())


def reload_app(app: str, task_modules: Sequence[str] = (), **options: Any) -> Any:
    """Import ``app`` afresh with all user modules; on failure the old modules stay.

    ``options`` are those of ``load_broker`` (``app_dir``, ``fs_discover``,
    ``tasks_patterns``); without them, those the app was first loaded with are used.
    """
    from pool.runtime.app import load_broker, load_options

    options = options or load_options(app)
    packages = app_packages(app, task_modules)
    saved = {
        name: mod for name, mod in list(sys.modules.items()) if is_user_module(name, mod, packages)
    }
    for name in saved:
        del sys.modules[name]
    try:
        return load_broker(app, task_modules, **options)
    except BaseException:
        sys.modules.update(saved)
        raise
