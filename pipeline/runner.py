"""Runs the stages in their fixed order, taking every entry whose key is unchanged from the cache.

A stage's key hashes its name, VERSION, the config it reads (`key_params`), its upstream keys and
the fingerprint of the input images, so changing one parameter reruns that stage and its
dependants and nothing else.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import time
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist

from pipeline.artifacts import ArtifactStore, read_json, stable_hash, write_json
from pipeline.config import Config
from pipeline.context import Context
from pipeline.errors import ConfigError, InputError, StorageError
from pipeline.heap import fix_mmap_threshold
from pipeline.images import ImageRecord, dataset_fingerprint, is_image_problem, scan_images, set_pixel_limit
from pipeline.lock import workdir_lock
from stages import cluster, embed, objects, pseudo_masks, saliency, train

STATE = "state.json"  # the last invocation's images folder, config and finished keys


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    module: ModuleType
    upstream: tuple[str, ...]

    def params(self, cfg: Config):
        return getattr(cfg, self.name)


STAGES = (
    Stage("saliency", saliency, ()),
    Stage("objects", objects, ("saliency",)),
    Stage("embed", embed, ("objects",)),
    Stage("cluster", cluster, ("embed",)),
    Stage("pseudo_masks", pseudo_masks, ("embed", "cluster")),
    Stage("train", train, ("pseudo_masks",)),
)
DISTRIBUTED = ("train",)  # the stages that run in every process under torchrun
STAGE_NAMES = tuple(s.name for s in STAGES)


@dataclasses.dataclass(frozen=True)
class Workdir:
    root: Path

    @property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.root / "cache")

    def state(self) -> dict:
        path = self.root / STATE
        if not path.is_file():
            raise InputError(f"{self.root} has no finished run yet (no {STATE}); start with `run`")
        return read_json(path)

    def latest_entry(self, stage: str) -> Path:
        """The entry of `stage` from the last run, e.g. for evaluate and export."""
        key = self.state().get("keys", {}).get(stage)
        entry = self.store.lookup(stage, key) if key else None
        if entry is None:
            raise InputError(f"{self.root}: no finished {stage} entry; run the pipeline first")
        return entry


def stage_keys(cfg: Config, images: list[ImageRecord], left_out: list[dict] = ()) -> dict[str, str]:
    inputs = dataset_fingerprint(images, left_out)
    keys: dict[str, str] = {}
    for stage in STAGES:
        keys[stage.name] = stable_hash({"stage": stage.name, "version": stage.module.VERSION,
                                        "params": stage.module.key_params(cfg),
                                        "upstream": {u: keys[u] for u in stage.upstream}, "inputs": inputs})
    return keys


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available (use device=cpu or device=auto)")
    return torch.device(name)


def run(cfg: Config, images_dir: str | Path, workdir: str | Path, start: str | None = None, only: bool = False,
        log=print) -> dict[str, str]:
    """Bring the stages up to date, taking unchanged ones from the cache; return their keys.

    With `start`, `only` stops after that stage (by default its dependants are brought up to date
    too, so the workdir stays consistent). Upstream stages come from the cache (computed if missing)."""
    if start is not None and start not in STAGE_NAMES:
        raise ConfigError(f"unknown stage {start!r} (stages: {', '.join(STAGE_NAMES)})")
    images, left_out = scan_images(images_dir, cfg.hash_content)
    problems = [e for e in left_out if is_image_problem(e)]
    if cfg.strict and problems:
        raise InputError(f"{problems[0]['image']}: {problems[0]['reason']} (strict mode stops at the first bad image)")
    fix_mmap_threshold()
    # Under torchrun every process runs this; rank 0 holds the lock for all of them.
    with workdir_lock(workdir) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():
        return _run(cfg, images, left_out, images_dir, workdir, start, only, log)


def _run(cfg: Config, images: list[ImageRecord], left_out: list[dict], images_dir, workdir, start: str | None,
         only: bool, log) -> dict[str, str]:
    until = start if only else STAGE_NAMES[-1]
    device = resolve_device(cfg.device)
    set_pixel_limit(cfg.max_pixels)
    wd = Workdir(Path(workdir))
    store = wd.store
    keys = stage_keys(cfg, images, left_out)
    todo = STAGES[:STAGE_NAMES.index(until) + 1]
    to_compute = [s for s in todo if store.lookup(s.name, keys[s.name]) is None]
    for stage in to_compute:  # fail on bad config and missing inputs before any work
        check = getattr(stage.module, "check", None)
        if check:
            check(Context(cfg, images, store, Path(), {}, device), stage.params(cfg))
    rank = _join_process_group(device, [s.name for s in to_compute])
    torch.manual_seed(cfg.seed)
    for stage in todo:
        key = keys[stage.name]
        started = time.perf_counter()
        if stage in to_compute:
            if store.items(stage.name).is_dir():  # per-image results are reused only if intact
                for older in store.finished_keys(stage.name):
                    store.lookup(stage.name, older)
            tmp = store.begin(stage.name, key)
            ctx = Context(cfg, images, store, tmp, {u: store.entry(u, keys[u]) for u in stage.upstream}, device, key,
                          skipped=list(left_out) if stage is STAGES[0] else [])  # the stage that reads the folder
            try:
                counts = stage.module.run(ctx, stage.params(cfg))
                seconds = time.perf_counter() - started
                if rank:  # under torchrun, rank 0 alone writes the entry
                    shutil.rmtree(tmp)
                    continue
                store.commit(stage.name, key, tmp, {
                    "version": stage.module.VERSION, "params": stage.module.key_params(cfg),
                    "upstream": {u: keys[u] for u in stage.upstream}, "inputs": dataset_fingerprint(images, left_out),
                    "counts": counts, "skipped": ctx.skipped, "seconds": round(seconds, 3)}, uses=ctx.uses)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # frees what this attempt wrote; finished per-image results stay
                raise StorageError(f"no space left on the device while stage {stage.name} wrote "
                                   f"{exc.filename or 'its results'}; free some space and run the same command "
                                   f"again: finished work is kept") from None
            log(f"{stage.name:<13} computed  {key[:12]}  {seconds:8.1f}s  {_summary(counts)}")
        else:
            log(f"{stage.name:<13} cached    {key[:12]}")
    if rank:
        return keys
    # Only a complete run becomes the workdir's state, so evaluate and export never mix two configs.
    write_json(wd.root / STATE, {"images": str(Path(images_dir).resolve()), "config": cfg.to_dict(),
                                 "keys": {s.name: keys[s.name] for s in todo}})
    return keys


def _join_process_group(device: torch.device, to_compute: list[str]) -> int:
    """Under torchrun (WORLD_SIZE > 1), join the process group and return this process's rank; else 0."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    serial = [name for name in to_compute if name not in DISTRIBUTED]
    if serial:
        raise ConfigError(f"under torchrun only {', '.join(DISTRIBUTED)} runs in every process; run the stages "
                          f"{', '.join(serial)} first without torchrun (`run_pipeline.py stage {serial[0]} ... --only`)")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank()


def status(workdir: str | Path) -> list[dict]:
    """Each stage of the last run's config, against the images folder as it is now: cached / stale / missing."""
    from pipeline.config import load_config_dict

    wd = Workdir(Path(workdir))
    state = wd.state()
    cfg = load_config_dict(state["config"])
    keys = stage_keys(cfg, *scan_images(state["images"], cfg.hash_content))
    rows = []
    for stage in STAGES:
        key = keys[stage.name]
        entry = wd.store.lookup(stage.name, key)
        if entry is not None:
            manifest = wd.store.manifest(stage.name, key)
            rows.append({"stage": stage.name, "status": "cached", "key": key, "bytes": wd.store.size_bytes(stage.name, key),
                         "seconds": manifest.get("seconds"), "finished": manifest.get("finished")})
        else:
            older = wd.store.finished_keys(stage.name)
            rows.append({"stage": stage.name, "status": "stale" if older else "missing", "key": key,
                         "bytes": None, "seconds": None, "finished": None})
    return rows


def _summary(counts: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in counts.items() if not isinstance(v, (list, dict)))
