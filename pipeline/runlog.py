"""A log file per CLI invocation: `<workdir>/logs/<timestamp>-<command>.log` holds the command line and
every line the command printed (stdout and stderr), so a run can be looked at after the terminal is gone.

Progress bars are left out: tqdm redraws them with carriage returns, which no printed line contains.
"""
from __future__ import annotations

import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from pipeline import torchrun
from pipeline.lock import LOCK, WorkdirBusyError, workdir_lock


class _Tee:
    """Writes through to the terminal stream and, except for progress-bar redraws, to the log."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        if "\r" not in text:
            self.log.write(text)
            self.log.flush()
        return self.stream.write(text)

    def __getattr__(self, name):  # isatty, flush, encoding, fileno, ...: the terminal's
        return getattr(self.stream, name)


def logged(workdir: Path, command: str, argv: list[str], body: Callable[[], int]) -> int:
    """Run `body` (a CLI command returning its exit code) with stdout and stderr teed into a new log file."""
    if torchrun.rank() != 0:  # under torchrun, rank 0 alone writes
        return body()
    folder = Path(workdir) / "logs"
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{command}.log"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        log_file = open(path, "a", encoding="utf-8")
    except OSError as exc:  # a read-only workdir: commands that only read must still work there
        print(f"note: no log written ({folder}: {exc.strerror})", file=sys.stderr)
        return body()
    started = time.perf_counter()
    with log_file as log:  # "a": two invocations in the same second share a file
        log.write(f"$ run_pipeline.py {shlex.join(argv)}\n# started {time.strftime('%Y-%m-%dT%H:%M:%S%z')}, pid {os.getpid()}\n")
        log.flush()
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(stdout, log), _Tee(stderr, log)
        code = None
        try:
            code = body()
            return code
        except Exception as exc:  # a bug, not a user error (those are printed by the CLI): keep its traceback
            log.write("".join(traceback.format_exception(exc)))
            raise
        finally:
            sys.stdout, sys.stderr = stdout, stderr
            log.write(f"# exit code {code if code is not None else 'none (uncaught exception)'} after "
                      f"{time.perf_counter() - started:.1f}s\n")


def remove_if_unused(workdir: Path) -> None:
    """Remove a workdir that a rejected command made (a check failed before any work): when all it holds is
    that command's log and the workdir lock, it is removed; anything else there keeps it all."""
    workdir = Path(workdir)
    if not workdir.is_dir():  # another rank of the same rejected torchrun command removed it already
        return
    files = [p for p in workdir.rglob("*") if not p.is_dir()]
    logs = [p for p in files if p.parent == workdir / "logs" and p.suffix == ".log"]
    if len(logs) > 1 or any(p not in logs and p != workdir / LOCK for p in files):
        return
    try:
        with workdir_lock(workdir):  # a command that started in it meanwhile holds the lock: then it all stays
            for path in {*files, workdir / LOCK}:
                path.unlink(missing_ok=True)
    except WorkdirBusyError:
        return
    try:  # a folder that gained a file meanwhile (another process) is not empty: it stays, with that file
        for folder in sorted((p for p in workdir.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            folder.rmdir()
        workdir.rmdir()
    except OSError:
        pass
