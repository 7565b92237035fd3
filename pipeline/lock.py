"""One writer per workdir: an exclusive lock on `WD/lock`, which also names its holder.

The lock is an `flock` on the file, so the kernel releases it when the holder dies (kill -9, power
loss): a lock left behind by a dead process is simply taken over. The file's text (pid, command,
start time) is only there to tell a second invocation who holds the workdir. A forked child (a
DataLoader worker) would share the lock and keep it alive after its parent was killed, so children
close their copy as soon as they are forked.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path

from pipeline.errors import PipelineError

LOCK = "lock"
_held_fds: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _held_fds:
        os.close(fd)
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class WorkdirBusyError(PipelineError):
    """Another live process is writing to the same workdir."""


@contextlib.contextmanager
def workdir_lock(workdir: Path):
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # read through our own descriptor: the holder may already have unlinked the file (remove_if_unused)
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise WorkdirBusyError(f"{workdir} is in use by {holder}; wait for it to finish or use another --workdir") from None
        left = os.read(fd, 4096).decode(errors="replace").strip()
        if left:
            print(f"note: took over the lock of {workdir} left by {left}, which is no longer running", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({' '.join(sys.argv)[:200]}, since {time.strftime('%H:%M:%S')})".encode(), 0)
        _held_fds.add(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released cleanly: nothing to take over
    finally:
        _held_fds.discard(fd)
        os.close(fd)
