"""A worker's ``print()`` and other writes to stdout/stderr, each line labelled with the worker.

The log handler keeps writing to the stream it was made with (its lines name the worker in
their format already); only what the app writes to ``sys.stdout``/``sys.stderr`` gets the
label, at the start of each line, as it is written (nothing is held back).
"""

from __future__ import annotations

import sys
import threading
from typing import Any, TextIO


class LabelledStream:
    """A text stream that writes ``label`` before each line it passes to ``stream``."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self._stream = stream
        self._label = label
        self._at_line_start = True
        self._lock = threading.Lock()  # sync tasks print from the worker's threads

    def write(self, text: str) -> int:
        if not text:
            return 0
        with self._lock:
            parts = text.splitlines(keepends=True)
            out = []
            for part in parts:
                if self._at_line_start:
                    out.append(self._label)
                out.append(part)
                self._at_line_start = part.endswith(("\n", "\r"))
            self._stream.write("".join(out))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, buffer, ...
        return getattr(self._stream, name)


def label_output(label: str) -> None:
    """Label every line this process writes to ``sys.stdout`` and ``sys.stderr``."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, LabelledStream):
            setattr(sys, name, LabelledStream(stream, label))
