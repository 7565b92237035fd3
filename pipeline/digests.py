"""sha256 of model files (weights, ONNX models), remembered by (path, size, mtime).

Cache keys name files by content, so a moved weights file keys the same and a file replaced at the same
path does not. Hashing a 100 MB checkpoint on every command would cost more than a cached rerun, so each
digest is remembered in `~/.cache/objseg/digests.json` (`$OBJSEG_DIGESTS` to move it) with the file's
inode, size and mtime, as DVC and git's index do: a file changed in place gets a new mtime.
The memo is a convenience: when it cannot be read or written, files are hashed again, never trusted blindly.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.artifacts import atomic_write, file_sha256

_memo: dict[str, list] | None = None  # resolved path -> [inode, size, mtime_ns, sha256]
_dirty = False


def _memo_file() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "objseg" / "digests.json"
    return Path(os.environ.get("OBJSEG_DIGESTS", default))


def _load() -> dict[str, list]:
    global _memo
    if _memo is None:
        try:
            loaded = json.loads(_memo_file().read_text())
            _memo = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            _memo = {}
    return _memo


def file_digest(path: str | Path) -> str:
    """The sha256 (hex) of the file at `path`, hashed once per (resolved path, inode, size, mtime)."""
    global _dirty
    path = Path(path).resolve()
    stat = path.stat()
    identity = [stat.st_ino, stat.st_size, stat.st_mtime_ns]
    memo = _load()
    remembered = memo.get(str(path))
    if not (isinstance(remembered, list) and remembered[:3] == identity):  # one record per path: no growth
        memo[str(path)] = [*identity, file_sha256(path)]
        _dirty = True
    return memo[str(path)][3]


def save() -> None:
    """Write the memo back (once per command, by the runner); a read-only home just means hashing again."""
    global _dirty
    if not _dirty:
        return
    try:
        atomic_write(_memo_file(), lambda tmp: tmp.write_text(json.dumps(_load(), indent=0, sort_keys=True)))
        _dirty = False
    except OSError:
        pass
