"""Content-addressed artifact store with atomic writes (after DVC's run-cache).

Layout under the workdir's `cache/`:
  <stage>/<key>/              a finished stage-level entry; `manifest.json` is written last
  <stage>/<key>.tmp-<pid>/    an entry being written; renamed into place when complete
  <stage>/items/<kk>/<key>.*  per-image results of per-image stages, each file written atomically

A directory without a manifest, or a file still named `*.tmp-<pid>`, is never read as finished.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Callable

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
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(path: Path, payload) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, default=str)))


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
    import faiss
    import torch
    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__, "faiss": faiss.__version__}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def items(self, stage: str) -> Path:
        """Folder of a per-image stage's per-image results, shared by all its entries."""
        return self.root / stage / "items"

    def lookup(self, stage: str, key: str) -> Path | None:
        path = self.entry(stage, key)
        return path if (path / MANIFEST).is_file() else None

    def manifest(self, stage: str, key: str) -> dict:
        return read_json(self.entry(stage, key) / MANIFEST)

    def finished_keys(self, stage: str) -> list[str]:
        """Keys of the finished entries of `stage`, newest first."""
        folder = self.root / stage
        if not folder.is_dir():
            return []
        found = [p for p in folder.iterdir() if p.name != "items" and ".tmp-" not in p.name and (p / MANIFEST).is_file()]
        return [p.name for p in sorted(found, key=lambda p: (p / MANIFEST).stat().st_mtime_ns, reverse=True)]

    def begin(self, stage: str, key: str) -> Path:
        """A fresh temporary folder to write the entry into; leftovers of dead processes are removed."""
        folder = self.root / stage
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob(f"{key}.tmp-*"):
            pid = leftover.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or not _pid_alive(int(pid)) or int(pid) == os.getpid():
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = folder / f"{key}.tmp-{os.getpid()}"
        tmp.mkdir()
        return tmp

    def commit(self, stage: str, key: str, tmp: Path, manifest: dict) -> Path:
        """Write the manifest last, then move the entry into place in one rename."""
        manifest = {**manifest, "stage": stage, "key": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "versions": software_versions()}
        write_json(tmp / MANIFEST, manifest)
        final = self.entry(stage, key)
        if final.exists():  # an identical entry finished meanwhile (same key = same content)
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, final)
        return final

    def size_bytes(self, stage: str, key: str) -> int:
        """Bytes of the entry, plus the per-image results it lists (per-image stages share those)."""
        entry = self.entry(stage, key)
        total = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
        listed = entry / "items.json"
        if listed.is_file() and self.items(stage).is_dir():
            keys = {item["key"] for item in read_json(listed) if "key" in item}
            total += sum(p.stat().st_size for p in self.items(stage).iterdir() if p.name.split(".")[0] in keys)
        return total
