"""Library chatter goes to the run folder, not the console.

TorchRec and torch report through `logging` and `warnings` (planner notes, FutureWarnings)
that a user of wdl cannot act on. `capture()` routes both into a buffer from the start of a run;
`attach(path)` writes the buffer, and everything after it, to `<run folder>/run.log`;
`release()` ends it. wdl's own messages are printed and stay on the console.
"""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_buffer: logging.handlers.MemoryHandler | None = None
_removed: list[logging.Handler] = []


def capture() -> None:
    """Route warnings and library log records (WARNING and above) into a buffer."""
    global _buffer
    root = logging.getLogger()
    if _buffer is None:
        _buffer = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
        _buffer.setFormatter(logging.Formatter(_FORMAT))
    # Replace console handlers (a library's logging.basicConfig) with the buffer; a handler on
    # the root stops any later basicConfig from adding one.
    for h in list(root.handlers):
        if h is not _buffer:
            root.removeHandler(h)
            _removed.append(h)  # given back by release(), for a caller that runs wdl in-process
    if _buffer not in root.handlers:
        root.addHandler(_buffer)
    root.setLevel(min(root.level or logging.WARNING, logging.WARNING))
    logging.captureWarnings(True)


def attach(path: Path) -> None:
    """From now on (and for what was buffered) write to `path`."""
    if _buffer is None:
        return
    old = _buffer.target
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    _buffer.setTarget(handler)
    _buffer.flushLevel = logging.DEBUG  # write through once there is a file
    _buffer.flush()
    if old is not None:
        old.close()


def release() -> None:
    """Close the file and give the root logger its earlier handlers back."""
    root = logging.getLogger()
    if _buffer is not None:
        if _buffer.target is not None:
            _buffer.flush()
            target = _buffer.target
            _buffer.setTarget(None)
            _buffer.flushLevel = logging.CRITICAL + 1
            target.close()
        _buffer.buffer.clear()
        root.removeHandler(_buffer)
    while _removed:
        root.addHandler(_removed.pop())
    logging.captureWarnings(False)
