"""Progress people can see: a live tqdm bar per batched job, and a few log lines per job.

The engine reports `progress(done, total)` in probes: 0 when a job starts, then after each layer of
a chunk's opening pass and after every decoding step (so `done` is fractional inside a chunk), and
`total` exactly when the job ends. This module turns the `progress=` setting into such a callback:

- `ProgressBar`: a tqdm bar (probes done, rate, time left), one per job, on the terminal;
- `ProgressLog`: the start, each quarter (or every N seconds) and the end of a job, as lines;
- `resolve_progress`: "auto" / None / True / False / a callable -> a callback or None.

A bar only helps on a terminal: "auto" is off when stderr is not one (CI logs, a pipe, pytest's
capture) and on xdist workers, whose output never reaches a terminal live.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from contextvars import ContextVar
from typing import IO, TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Union

from pytest_patchscope.errors import ProbeConfigError

if TYPE_CHECKING:
    from tqdm import tqdm

ProgressCallback = Callable[[float, int], None]
"""progress(done, total): probes done of the job's total; `done` grows within a chunk too (by
decoding steps), so it may be fractional, and reaches `total` exactly when the job ends."""
ProgressSetting = Union[None, bool, str, ProgressCallback]
"""What `Patchscope(progress=...)` takes: see `resolve_progress`."""

DEFAULT_LABEL = "patchscope"
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"
"""tqdm's own layout, with the (fractional) probes done shown whole."""
MIN_REFRESH_S = 0.2
"""The bar redraws at most this often: enough for a live rate, cheap next to a decoding step."""
MIN_BAR_PROBES = 2
"""A job of fewer probes draws no bar: a single generate() prints nothing; a sweep's bar is drawn from its start."""

_LABEL: ContextVar[str] = ContextVar("patchscope_progress_label", default=DEFAULT_LABEL)


@contextlib.contextmanager
def progress_label(label: str) -> Iterator[None]:
    """Name the jobs started inside the block (e.g. "token identity") in bars and log lines."""
    token = _LABEL.set(label)
    try:
        yield
    finally:
        _LABEL.reset(token)


def current_label() -> str:
    return _LABEL.get()


def under_xdist_worker() -> bool:
    """True in a pytest-xdist worker, whose stderr is not the user's terminal."""
    return bool(os.environ.get("PYTEST_XDIST_WORKER"))


def is_terminal(stream: Any) -> bool:
    """Whether `stream` is an interactive terminal (False for files, pipes, StringIO, closed streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def auto_bar(stream: Any = None) -> bool:
    """The "auto" rule: a bar when `stream` (default: stderr now) is a terminal, not on an xdist worker."""
    return is_terminal(sys.stderr if stream is None else stream) and not under_xdist_worker()


class _Jobs:
    """Tells one job's reports from the next job's: every report of done == 0 opens a job (one cut
    short by an error is simply replaced), which is over at done == total. Reports with no open job
    (the engine reports the end twice) are ignored."""

    def __init__(self) -> None:
        self.total: int | None = None
        """The open job's total; None when no job is open."""

    def report(self, done: float, total: int) -> str | None:
        """"start" (a new job, with total > 0), "update", or None (nothing to show)."""
        if done == 0:
            self.total = total if total > 0 else None
            return "start" if total > 0 else None
        return None if self.total is None else "update"

    def end(self) -> None:
        self.total = None


class ProgressBar:
    """A live tqdm bar per job: probes done, rate (probe/s) and time left.

    A report of done == 0 opens a new bar (for a job of 2 probes or more), closing one left open by
    an error; the bar closes when done == total.
    `file` is where it is drawn (default: sys.stderr as it is when each job starts); `leave=False`
    erases the finished bar instead of keeping its last line.
    """

    def __init__(self, file: Any = None, *, leave: bool = True, ncols: int | None = None,
                 mininterval: float = MIN_REFRESH_S) -> None:
        self.file = file
        self.leave = leave
        self.ncols = ncols
        self.mininterval = mininterval
        self._jobs = _Jobs()
        self._bar: tqdm | None = None

    def __call__(self, done: float, total: int) -> None:
        what = self._jobs.report(done, total)
        if what == "start" or (what is None and done == 0):
            self.close()  # the last job's bar, if still open, was cut short (by an error)
        if what == "start" and total >= MIN_BAR_PROBES:
            self._bar = self._open(total)
        bar = self._bar
        if what is None or bar is None:
            return
        bar.update(min(done, total) - bar.n)
        if done >= total:
            bar.n = total
            self.close()
            self._jobs.end()

    def _open(self, total: int) -> "tqdm":
        from tqdm import tqdm

        self._before_open()
        return tqdm(
            total=total, desc=current_label(), unit="probe", file=self.file if self.file is not None else sys.stderr,
            leave=self.leave, ncols=self.ncols, mininterval=self.mininterval, miniters=0, smoothing=0,
            bar_format=BAR_FORMAT, dynamic_ncols=self.ncols is None,
        )

    def close(self) -> None:
        """Close the open bar, if any (its last line stays with leave=True)."""
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()
            self._after_close()

    def _before_open(self) -> None:
        """Hook for subclasses: runs right before a bar is drawn."""

    def _after_close(self) -> None:
        """Hook for subclasses: runs right after a bar is closed."""


class _SuspendedCapture:
    """A file for tqdm: each write goes to `stream` with pytest's output capture suspended around
    it (as pytest's live logging does), and the first one starts a line of its own."""

    def __init__(self, stream: IO[str], suspended: Callable[[], ContextManager[Any]]) -> None:
        self.stream = stream
        self.suspended = suspended
        self.encoding = getattr(stream, "encoding", None)
        self.prefix = ""
        self.wrote = False

    def write(self, text: str) -> int:
        with self.suspended():
            self.stream.write(self.prefix + text)
            self.stream.flush()
        self.prefix, self.wrote = "", True
        return len(text)

    def flush(self) -> None:
        """Every write is flushed already."""


class TerminalBar(ProgressBar):
    """The bar inside a pytest session: drawn on pytest's terminal stream while a test's output is
    captured, on the line under the test's own.

    On a terminal it is erased when the job ends and the cursor goes back to where pytest left it,
    so the session's output reads as without it; elsewhere (a forced bar into a pipe or a log) its
    last line stays. `writer()` gives pytest's TerminalWriter (or None), to know that line's width;
    `terminal` says whether `stream` is a terminal (looked at before capture began; default: now).
    """

    def __init__(self, stream: IO[str], suspended: Callable[[], ContextManager[Any]], writer: Callable[[], Any],
                 terminal: bool | None = None) -> None:
        self.terminal = is_terminal(stream) if terminal is None else terminal
        super().__init__(_SuspendedCapture(stream, suspended), leave=not self.terminal)
        self._writer = writer
        self._column = 0

    def _before_open(self) -> None:
        writer = self._writer()
        self._column = int(writer.width_of_current_line) if writer is not None else 0
        if writer is not None:
            writer.flush()
            self.ncols = max(20, min(int(writer.fullwidth) - 1, 120))
        assert isinstance(self.file, _SuspendedCapture)
        self.file.prefix, self.file.wrote = ("\n" if self._column else ""), False

    def _after_close(self) -> None:
        assert isinstance(self.file, _SuspendedCapture)
        if self.file.wrote and self._column and self.terminal:
            self.file.write(f"\x1b[1A\x1b[{self._column + 1}G")  # up to pytest's line, to its end


class ProgressLog:
    """A few lines per job through `write`: its start, each `step` of the way (or every `every_s`
    seconds, whichever comes first) and its end with the rate, so a log stays short.
    `announce=False` leaves out the start line, for a caller that says it already."""

    def __init__(self, write: Callable[[str], None], *, step: float = 0.25, every_s: float = 30.0, announce: bool = True) -> None:
        self.write = write
        self.announce = announce
        self.step = step
        self.every_s = every_s
        self._jobs = _Jobs()
        self._label = DEFAULT_LABEL
        self._started = self._last_line = 0.0
        self._next = step

    def __call__(self, done: float, total: int) -> None:
        now = time.perf_counter()
        what = self._jobs.report(done, total)
        if what is None:
            return
        if what == "start":
            self._label, self._started, self._last_line, self._next = current_label(), now, now, self.step
            if self.announce:
                self.write(f"{self._label}: {total} probe{'s' if total != 1 else ''} to run")
            if done < total:
                return
        elapsed = now - self._started
        if done >= total:
            self.write(f"{self._label}: {total}/{total} probes (100%) in {elapsed:.1f} s, {total / max(elapsed, 1e-9):.1f} probes/s")
            self._jobs.end()
            return
        fraction = done / total
        if fraction >= self._next or now - self._last_line >= self.every_s:
            self._next = (math.floor(fraction / self.step) + 1) * self.step
            self._last_line = now
            self.write(f"{self._label}: {done:.0f}/{total} probes ({100 * fraction:.0f}%) after {elapsed:.1f} s")


def combine(*callbacks: "ProgressCallback | None") -> "ProgressCallback | None":
    """One callback that tells every given one (None when none is given)."""
    chosen = [c for c in callbacks if c is not None]
    if not chosen:
        return None
    if len(chosen) == 1:
        return chosen[0]

    def both(done: float, total: int) -> None:
        for callback in chosen:
            callback(done, total)

    return both


ALLOWED = ("'auto' or None (a live bar when stderr is a terminal, not on an xdist worker), True (always a bar), "
           "False (none), or a callable progress(done, total) told the probes done of each job's total")


def resolve_progress(value: Any, field: str = "progress") -> "ProgressCallback | None":
    """The callback for a `progress=` setting: "auto"/None, True, False, or a callable used as is."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return ProgressBar() if auto_bar() else None
    if value is True:
        return ProgressBar()
    if value is False:
        return None
    if callable(value):
        return value
    raise ProbeConfigError(field, value, ALLOWED)

