"""Content-addressed artifact store with atomic writes (after DVC's run-cache).

Layout under the workdir's `cache/`:
  <stage>/<key>/              a finished stage-level entry; `manifest.json` is written last
  <stage>/<key>.tmp-<host>-<pid>/  an entry being written; renamed into place when complete
  <stage>/items/<key>.*            per-image results of per-image stages, each file written atomically

A directory without a manifest, or a file still named `*.tmp-<host>-<pid>`, is never read as finished.
The writer's host is in the name because processes on several machines (torchrun on a shared filesystem)
write into one cache, and a pid means something on its own host only: a leftover is removed as dead only
by a process on the host that made it.
The manifest records size and sha256 of every file the entry is made of (its own and the per-image
results it uses) and a checksum of itself; `lookup` verifies them, so a truncated array, a deleted
mask or an edited manifest is reported and recomputed, never used: a corrupt entry is deleted with
its bad per-image results, so only those are computed again.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from pipeline.errors import CacheCorruptError

MANIFEST = "manifest.json"
KEY_LENGTH = 24


def stable_hash(payload) -> str:
    """sha256 of the canonical JSON of `payload` (sorted keys, no whitespace), shortened."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` and rename the result to `path`, so `path` is complete or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{writer_tag()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def temp_dir_beside(target: Path) -> Path:
    """A new empty folder next to `target`, made for this call alone (so removing it can only remove what
    this call wrote): where a command builds a folder before renaming it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def write_json(path: Path, payload) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, default=str)))


def _self_checksum(manifest: dict) -> str:
    return stable_hash({k: v for k, v in manifest.items() if k != "checksum"})


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CacheCorruptError(f"cannot read {path}: {exc}") from None


def save_npy(path: Path, array: np.ndarray) -> Path:
    def write(tmp: Path):
        with open(tmp, "wb") as f:
            np.save(f, array)
    return atomic_write(path, write)


def software_versions() -> dict:
    import torch

    from pipeline.faiss_runtime import faiss
    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__, "faiss": faiss.__version__}


def writer_tag(pid: int | None = None) -> str:
    """`tmp-<host>-<pid>`: what a temporary name carries to say which process (by default this one) wrote it."""
    return f"tmp-{socket.gethostname()}-{os.getpid() if pid is None else pid}"


def _abandoned(tmp: Path, key: str) -> bool:
    """Whether the temporary entry folder `tmp` of `key` was left by a dead process of this host (or by an
    earlier attempt of this very process). A folder of another host is never judged: its pid is not ours."""
    writer = tmp.name.removeprefix(f"{key}.tmp-")
    host, _, pid = writer.rpartition("-")
    if host and host != socket.gethostname():
        return False
    return not pid.isdigit() or int(pid) == os.getpid() or not _pid_alive(int(pid))  # no host: named before hosts were


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ArtifactStore:
    def __init__(self, root: str | Path, repair: bool = False):
        self.root = Path(root)
        self.repair = repair  # only a writer holding the workdir lock moves a damaged entry aside
        # sha256 by (path, inode, size, mtime): entries of one stage share their per-image results, and
        # verifying the older entries, then recording the results in the new one, must hash each file once
        self._digests: dict[tuple, str] = {}

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def items(self, stage: str) -> Path:
        """Folder of a per-image stage's per-image results, shared by all its entries."""
        return self.root / stage / "items"

    def lookup(self, stage: str, key: str) -> Path | None:
        """The finished entry, or None when there is none. A damaged one (failed verification) is deleted with
        its bad per-image results when repairing, so they are recomputed; a reader gets CacheCorruptError."""
        path = self.entry(stage, key)
        if not (path / MANIFEST).is_file():
            return None
        problems = self.verify(stage, key)
        if not problems:
            return path
        listed = "; ".join(f"{name}: {why}" for name, why in list(problems.items())[:3])
        if not self.repair:
            raise CacheCorruptError(f"cache entry {path} is damaged ({listed}{'; ...' if len(problems) > 3 else ''}); "
                                    f"run the same `run` command again to recompute it")
        print(f"warning: cache entry {path} is corrupt ({listed}{'; ...' if len(problems) > 3 else ''}); "
              f"it will be recomputed", file=sys.stderr)
        for name in problems:  # a bad per-image result goes with its siblings (a shard's .npy and .json)
            if name.startswith("items/"):
                for sibling in self.items(stage).glob(f"{Path(name).name.split('.')[0]}.*"):
                    sibling.unlink()
        shutil.rmtree(path)
        return None

    def verify(self, stage: str, key: str) -> dict[str, str]:
        """What is wrong with a finished entry, by file: an unreadable or edited manifest, a missing or
        changed file. Per-image results are named `items/<file>`."""
        path = self.entry(stage, key)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            return {MANIFEST: f"unreadable ({exc})"}
        if not isinstance(manifest, dict) or manifest.get("checksum") != _self_checksum(manifest):
            return {MANIFEST: "edited, or written by an older version"}
        problems = {}
        for base, records in ((path, manifest["files"]), (self.root / stage, manifest["uses"])):
            for name, (size, digest) in records.items():
                file = base / name
                if not file.is_file():
                    problems[name] = "missing"
                elif file.stat().st_size != size:
                    problems[name] = f"{file.stat().st_size} bytes, not {size}"
                elif self._sha256(file) != digest:
                    problems[name] = "content changed (sha256)"
        return problems

    def _file_record(self, path: Path) -> list:
        return [path.stat().st_size, self._sha256(path)]

    def _sha256(self, file: Path) -> str:
        stat = file.stat()
        identity = (str(file), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if identity not in self._digests:
            self._digests[identity] = file_sha256(file)
        return self._digests[identity]

    def manifest(self, stage: str, key: str) -> dict:
        return read_json(self.entry(stage, key) / MANIFEST)

    def finished_keys(self, stage: str) -> list[str]:
        """Keys of the finished entries of `stage`, newest first."""
        folder = self.root / stage
        if not folder.is_dir():
            return []
        found = [p for p in folder.iterdir() if p.name != "items" and "." not in p.name and (p / MANIFEST).is_file()]
        return [p.name for p in sorted(found, key=lambda p: (p / MANIFEST).stat().st_mtime_ns, reverse=True)]

    def begin(self, stage: str, key: str) -> Path:
        """A fresh temporary folder to write the entry into; leftovers of dead processes of this host are removed."""
        folder = self.root / stage
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob(f"{key}.tmp-*"):
            if _abandoned(leftover, key):
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = folder / f"{key}.{writer_tag()}"
        tmp.mkdir()
        return tmp

    def commit(self, stage: str, key: str, tmp: Path, manifest: dict, uses: Iterable[Path] = ()) -> Path:
        """Checksum the entry's files and the per-image results it `uses`, write the manifest last, then
        move the entry into place in one rename."""
        stage_folder = self.root / stage
        manifest = {**manifest, "stage": stage, "key": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "versions": software_versions(),
                    "files": {p.relative_to(tmp).as_posix(): self._file_record(p)
                              for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != MANIFEST},
                    "uses": {Path(p).relative_to(stage_folder).as_posix(): self._file_record(Path(p)) for p in sorted(set(uses))}}
        manifest["checksum"] = _self_checksum(manifest)
        write_json(tmp / MANIFEST, manifest)
        final = self.entry(stage, key)
        if final.exists():  # an identical entry finished meanwhile (same key = same content)
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, final)
        return final

    def size_bytes(self, stage: str, key: str) -> int:
        """Bytes of the entry, plus the per-image results it uses (per-image stages share those)."""
        entry = self.entry(stage, key)
        return sum(p.stat().st_size for p in entry.rglob("*") if p.is_file()) + \
            sum(size for size, _ in self.manifest(stage, key).get("uses", {}).values())
