"""Standard output and error that a closed pipe does not break (`hybridctl compare | head -3`).

Python ignores SIGPIPE, so a write to a pipe whose reader has exited raises BrokenPipeError wherever it happens:
in the middle of a command, whose files and checkpoints would then go unwritten, and once more when the
interpreter flushes the stream at exit. `pipe_safe()` (the CLI runs every command inside it) puts stdout and
stderr on files that, at the first such write, point the stream at os.devnull (Python's own advice) and note it:
from then on printing goes nowhere, without an error, and the work goes on. The CLI exits 141 (128 + SIGPIPE),
the status a Unix tool killed by SIGPIPE has. Work that only prints, or that can stop and be resumed, asks
`closed()` and stops: a training run whose progress output is gone saves a checkpoint and stops as after SIGTERM
(TrainProgress.output_closed), `generate` stops generating (OutputClosed).
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import sys

EXIT_PIPE = 141  # 128 + SIGPIPE (13)
STDOUT, STDERR = 1, 2

_closed: set[int] = set()  # the file descriptors found closed, now on os.devnull


class OutputClosed(Exception):
    """Raised by work whose only product is its output, once that output is closed: the CLI exits EXIT_PIPE."""


def closed(fd: int | None = None) -> bool:
    """Whether stdout or stderr (or `fd` alone: STDOUT, STDERR) was found closed (its pipe's reader
    exited) since the command started."""
    return bool(_closed) if fd is None else fd in _closed


def silence(fd: int) -> None:
    """Point `fd` at os.devnull: later writes, Python's flush at exit included, succeed and go nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
    _closed.add(fd)


def reader_gone(fd: int) -> bool:
    """Whether `fd` is a pipe whose reader has exited (poll reports an error on it without writing)."""
    if not hasattr(select, "poll"):
        return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def silence_closed() -> bool:
    """After a BrokenPipeError that came past pipe_safe (a stream kept from before it): silence stdout and stderr
    where their reader is gone; whether one was."""
    for fd in (STDOUT, STDERR):
        if fd not in _closed and reader_gone(fd):
            silence(fd)
    return closed()


class PipeSafeFile(io.FileIO):
    """A file descriptor written through, whose broken pipe silences it instead of raising."""

    def write(self, data) -> int:
        try:
            return super().write(data)
        except BrokenPipeError:
            silence(self.fileno())
            return memoryview(data).nbytes


def pipe_safe_stream(stream):
    """A text stream on the same file descriptor and settings as `stream`, written through PipeSafeFile; `stream`
    itself where it has no file descriptor (a test's capture)."""
    try:
        fd = stream.fileno()
        encoding, errors = stream.encoding, stream.errors
    except (AttributeError, OSError, ValueError):
        return stream
    stream.flush()
    raw = PipeSafeFile(fd, "w", closefd=False)
    buffered = isinstance(getattr(stream, "buffer", None), io.BufferedIOBase)
    return io.TextIOWrapper(io.BufferedWriter(raw) if buffered else raw, encoding=encoding, errors=errors,
                            line_buffering=getattr(stream, "line_buffering", False),
                            write_through=getattr(stream, "write_through", False))


def flush() -> None:
    """Flush stdout and stderr now, so that a pipe closed before the end of the output is noticed."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            silence_closed()
        except (OSError, ValueError):
            pass


@contextlib.contextmanager
def pipe_safe():
    """stdout and stderr that a closed pipe silences (see the module's docstring), the originals put back after."""
    _closed.clear()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = pipe_safe_stream(sys.stdout), pipe_safe_stream(sys.stderr)
    try:
        yield
    finally:
        flush()
        sys.stdout, sys.stderr = saved
