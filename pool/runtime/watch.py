"""``pool run --reload``: a changed file triggers the rolling restart SIGHUP does.

As in ``taskiq worker --reload``, any file change in the watched directories counts (the
current directory unless ``--reload-dir`` says otherwise), except in version-control and
cache directories, compiled files and editor swap files (watchfiles' default filter), files
that the nearest ``.gitignore`` ignores (unless ``--do-not-use-gitignore``) and the pool's
own run directory. Changes that arrive together make one restart. Unlike taskiq, the pool
keeps its worker count: the rolling restart starts each new worker before an old one
drains, and if the new code fails to import, the running workers stay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("pool.reload")

DEBOUNCE_MS = 400


def nearest_gitignore(directory: Path) -> Path | None:
    """The ``.gitignore`` of ``directory`` or of its closest parent that has one."""
    for candidate in (directory, *directory.parents):
        path = candidate / ".gitignore"
        if path.is_file():
            return path
        if (candidate / ".git").exists():  # the repository's top: look no further
            return None
    return None


class ChangeFilter:
    """watchfiles' default filter, plus .gitignore rules and paths never to watch."""

    def __init__(self, dirs: Sequence[Path], use_gitignore: bool, ignore: Sequence[Path]) -> None:
        from watchfiles import DefaultFilter

        self.default = DefaultFilter()
        self.ignore = [p.resolve() for p in ignore]
        self.rules: list[tuple[Path, Any]] = []
        if use_gitignore:
            for directory in dirs:
                self._add_gitignore(directory)

    def _add_gitignore(self, directory: Path) -> None:
        path = nearest_gitignore(directory)
        if path is None or any(root == path.parent for root, _ in self.rules):
            return
        try:
            import pathspec
        except ImportError:  # pragma: no cover - pathspec comes with the reload extra
            logger.warning("--reload: pathspec is missing, %s is not applied", path)
            return
        spec = pathspec.GitIgnoreSpec.from_lines(path.read_text().splitlines())
        self.rules.append((path.parent, spec))

    def __call__(self, change: Any, path: str) -> bool:
        if not self.default(change, path):
            return False
        resolved = Path(path).resolve()
        if any(resolved.is_relative_to(p) for p in self.ignore):
            return False
        for root, spec in self.rules:
            if resolved.is_relative_to(root) and spec.match_file(str(resolved.relative_to(root))):
                return False
        return True


async def watch_for_changes(
    dirs: Sequence[str],
    on_change: Callable[[], None],
    use_gitignore: bool = True,
    ignore: Sequence[Path] = (),
) -> None:
    """Call ``on_change`` after each batch of relevant changes under ``dirs``, until
    cancelled."""
    from watchfiles import awatch

    roots = [Path(d).resolve() for d in dirs]
    watch_filter = ChangeFilter(roots, use_gitignore, ignore)
    logger.info("--reload: watching %s", ", ".join(str(r) for r in roots))
    async for changes in awatch(*roots, watch_filter=watch_filter, debounce=DEBOUNCE_MS):
        names = sorted({Path(path).name for _, path in changes})
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        logger.info("--reload: %s changed: rolling restart", shown)
        on_change()
