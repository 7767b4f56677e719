"""Crash-safe files: one atomic-write helper, one inter-process lock, and stale temp-file clean-up.

Used by the baseline storage, the reports and the weights cache, so that a process killed at any
moment leaves the old file or the new one, never half of one, and no temp file for good.
"""
from __future__ import annotations

import contextlib
import os
import re
import uuid
from pathlib import Path
from typing import Iterator

_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def temp_name(target: Path) -> Path:
    """The temp file beside ``target`` that :func:`atomic_write` uses: ``.<name>.<pid>.<hex>.tmp``."""
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Replace ``path`` with ``data`` so that readers (and crashes) see the old or the new file, never half.

    Writes a temp file in the same directory, fsyncs it, ``os.replace``s it over ``path`` and fsyncs
    the directory. On any failure (an exception or KeyboardInterrupt) the temp file is removed and
    ``path`` is untouched; a SIGKILL can leave the temp file, which :func:`remove_stale_temps` clears.
    Raises OSError.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        # os.open with 0o666 lets the umask decide permissions, as for an ordinary new file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # Windows cannot open a directory; NTFS journals the rename itself.
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(target: str | os.PathLike[str]) -> list[Path]:
    """Delete temp files of ``target`` left by killed writers (their pid is gone); returns them.

    Call it under :func:`file_lock` of the same target, so that no live writer is racing it.
    """
    target = Path(target)
    removed = []
    with contextlib.suppress(OSError):
        for entry in target.parent.iterdir():
            match = _TEMP_NAME.match(entry.name)
            if match and match["name"] == target.name and not _pid_alive(int(match["pid"])):
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(entry)
    return removed


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """An exclusive lock between processes (xdist workers, concurrent CI jobs) on POSIX.

    ``path`` is a lock file (created if needed, and kept: deleting a lock file while another
    process waits on it would let a third one in) or an existing directory, which is locked
    itself, so that a baseline's folder gains no lock file. A no-op without ``fcntl``.
    """
    lock = Path(path)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    if lock.is_dir():
        fd = os.open(lock, os.O_RDONLY)
    else:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
