"""Runs the stages in their fixed order, taking every entry whose key is unchanged from the cache.

A stage's key hashes its name, VERSION, the config it reads (`key_params`), its upstream keys and
the fingerprint of the input images, so changing one parameter reruns that stage and its
dependants and nothing else.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Sequence

import torch

from pipeline import digests, distributed, torchrun
from pipeline.artifacts import MANIFEST, ArtifactStore, read_json, stable_hash, write_json
from pipeline.config import RunConfig, config_from_dict, parse_config
from pipeline.context import Context
from pipeline.errors import ConfigError, InputError, StorageError
from pipeline.heap import fix_mmap_threshold
from pipeline.images import ImageRecord, dataset_fingerprint, is_image_problem, scan_images, set_pixel_limit
from pipeline.lock import workdir_lock
from stages import cluster, embed, objects, pseudo_masks, saliency, train

STATE = "state.json"  # the last finished run (images folder, config, keys, files left out) and, under "earlier",
# the newest earlier run for each other last stage reached
SHOWN_LEFT_OUT = 20  # files left out by the scan that are printed; the state lists them all


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
class Config(RunConfig):
    """The whole config: the run-level settings and one section per stage, named as the stage."""
    saliency: saliency.Params = saliency.Params()
    objects: objects.Params = objects.Params()
    embed: embed.Params = embed.Params()
    cluster: cluster.Params = cluster.Params()
    pseudo_masks: pseudo_masks.Params = pseudo_masks.Params()
    train: train.Params = train.Params()


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- `section.key=value` overrides, validated into a Config."""
    return parse_config(Config, path, overrides)


def load_config_dict(raw: dict) -> Config:
    """A Config from a dict such as `Config.to_dict()` wrote (the workdir's state)."""
    return config_from_dict(Config, raw)


@dataclasses.dataclass(frozen=True)
class Workdir:
    """A workdir as the commands see it. Readers (status, evaluate, export, report) never repair or delete:
    a damaged entry is reported and left for `run`, which opens the workdir with `repair=True` under its lock."""
    root: Path
    repair: bool = False

    @property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.root / "cache", repair=self.repair)

    def runs(self) -> list[dict]:
        """Every remembered run (images folder, config, keys of the stages it reached), newest first."""
        path = self.root / STATE
        if not path.is_file():
            raise InputError(f"{self.root} has no finished run yet (no {STATE}); start with `run`")
        state = read_json(path)
        return [{k: v for k, v in state.items() if k != "earlier"}, *state.get("earlier", [])]

    def last_run(self, reaching: str) -> dict:
        """The newest run that reached stage `reaching`: what evaluate, export and report read, so a later
        partial run (`stage cluster --only ...`) leaves the last complete result reachable, never mixed with it."""
        for record in self.runs():
            if reaching in record.get("keys", {}):
                return record
        raise InputError(f"{self.root}: no finished {reaching} entry; run the pipeline first")

    def latest_entry(self, stage: str, record: dict | None = None) -> Path:
        """The entry of `stage` from `record` (default: the newest run that reached it)."""
        key = (record or self.last_run(stage))["keys"].get(stage)
        entry = self.store.lookup(stage, key) if key else None
        if entry is None:
            raise InputError(f"{self.root}: no finished {stage} entry; run the pipeline first")
        return entry

    def remember(self, record: dict) -> None:
        """Add a finished run; it replaces the remembered run that reached the same last stage."""
        try:
            older = self.runs()
        except InputError:
            older = []
        kept = [r for r in older if _last_stage(r) != _last_stage(record)]
        write_json(self.root / STATE, {**record, "earlier": kept})


def _last_stage(record: dict) -> str:
    return max(record.get("keys", {}), key=STAGE_NAMES.index, default="")


def stage_keys(cfg: Config, images: list[ImageRecord]) -> dict[str, str]:
    """Files that are not used (left out by the scan) are in no key: a stray README.txt changes nothing."""
    inputs = dataset_fingerprint(images)
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
    too, so the workdir stays consistent). Upstream stages come from the cache (computed if missing).
    Under torchrun every process runs this (see pipeline/distributed.py)."""
    if start is not None and start not in STAGE_NAMES:
        raise ConfigError(f"unknown stage {start!r} (stages: {', '.join(STAGE_NAMES)})")
    images, left_out = scan_images(images_dir, cfg.hash_content)
    problems = [e for e in left_out if is_image_problem(e)]
    if cfg.strict and problems:
        raise InputError(f"{problems[0]['image']}: {problems[0]['reason']} (strict mode stops at the first bad image)")
    first_rank = torchrun.rank() == 0
    if first_rank:
        _print_left_out(left_out, Path(workdir) / STATE)
    fix_mmap_threshold()
    in_callers_group = distributed.joined()  # `predict` runs the saliency stage inside its own group
    # Under torchrun rank 0 holds the lock for all the processes.
    try:
        with workdir_lock(workdir) if first_rank else contextlib.nullcontext():
            return _run(cfg, images, left_out, images_dir, workdir, start, only, log if first_rank else _quiet)
    finally:
        if not in_callers_group:
            distributed.leave()


def _run(cfg: Config, images: list[ImageRecord], left_out: list[dict], images_dir, workdir, start: str | None,
         only: bool, log) -> dict[str, str]:
    until = start if only else STAGE_NAMES[-1]
    device = resolve_device(cfg.device)
    set_pixel_limit(cfg.max_pixels)
    wd = Workdir(Path(workdir), repair=True)
    store = wd.store
    keys = stage_keys(cfg, images)
    digests.save()
    todo = STAGES[:STAGE_NAMES.index(until) + 1]
    share = distributed.join(device)
    # Rank 0 alone repairs (a damaged entry is deleted) and checks; every rank then knows what to compute.
    first_keys, to_compute = distributed.from_rank_zero(
        lambda: (keys, _to_compute(cfg, images, store, keys, todo, device)))
    if first_keys != keys:
        raise InputError(f"rank {share.rank} sees other images or another config than rank 0 (its stage keys "
                         f"differ): every process must read the same photos folder, e.g. on a shared filesystem")
    torch.manual_seed(cfg.seed)
    counts_of: dict[str, dict] = {}  # each finished stage's counts, for the later stages' `check_counts`
    for position, stage in enumerate(todo):
        key = keys[stage.name]
        started = time.perf_counter()
        if stage.name in to_compute:
            counts = _compute(cfg, images, store, keys, stage, device, share)
            seconds = time.perf_counter() - started
            if share.rank:
                continue
            log(f"{stage.name:<13} computed  {key[:12]}  {seconds:8.1f}s  {_summary(counts)}")
        else:
            if share.rank:
                continue
            counts = store.manifest(stage.name, key)["counts"]
            log(f"{stage.name:<13} cached    {key[:12]}")
        counts_of[stage.name] = counts
        for later in todo[position + 1:]:  # e.g. cluster.k against the object count, before embedding them
            check_counts = getattr(later.module, "check_counts", None)
            if check_counts and later.name in to_compute:
                check_counts(later.params(cfg), counts_of)
    if share.rank:
        return keys
    # Only a finished run is remembered, as a whole, so evaluate and export never mix two configs.
    wd.remember({"images": str(Path(images_dir).resolve()), "config": cfg.to_dict(),
                 "keys": {s.name: keys[s.name] for s in todo}, "left_out": left_out,
                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return keys


def _to_compute(cfg: Config, images: list[ImageRecord], store: ArtifactStore, keys: dict[str, str],
                todo: tuple[Stage, ...], device: torch.device) -> list[str]:
    """The stages of `todo` with no intact entry, checked: bad config and missing inputs fail before any work."""
    to_compute = [s for s in todo if store.lookup(s.name, keys[s.name]) is None]
    for stage in to_compute:
        check = getattr(stage.module, "check", None)
        if check:
            check(Context(cfg, images, store, Path(), {}, device), stage.params(cfg))
    return [s.name for s in to_compute]


def _compute(cfg: Config, images: list[ImageRecord], store: ArtifactStore, keys: dict[str, str], stage: Stage,
             device: torch.device, share: distributed.Share) -> dict:
    """Compute one stage's entry; rank 0 commits it and returns its counts. Under torchrun a per-image stage
    (one with `make`) first makes each rank's share of the per-image results, and rank 0 then only lists them;
    a dataset-level stage runs on rank 0 while the others wait, except those in DISTRIBUTED (training)."""
    started = time.perf_counter()
    key, params = keys[stage.name], stage.params(cfg)
    upstream = {u: store.entry(u, keys[u]) for u in stage.upstream}
    tmp = None
    try:
        if share.rank == 0 and store.items(stage.name).is_dir():  # per-image results are reused only if intact
            for older in store.finished_keys(stage.name):
                store.lookup(stage.name, older)
        made = []
        if share.world > 1 and hasattr(stage.module, "make"):
            distributed.barrier()  # rank 0 removed damaged per-image results: they are made again below
            made = distributed.gathered_on_rank_zero(
                stage.module.make(Context(cfg, images, store, Path(), upstream, device, key, share=share), params))
        counts = {}
        if share.rank == 0 or stage.name in DISTRIBUTED:
            tmp = store.begin(stage.name, key)
            ctx = Context(cfg, images, store, tmp, upstream, device, key)
            counts = stage.module.run(ctx, params)
            if share.rank:  # rank 0 alone writes the entry
                shutil.rmtree(tmp)
            else:
                counts = _with_made_counts(counts, made)
                store.commit(stage.name, key, tmp, {
                    "version": stage.module.VERSION, "params": stage.module.key_params(cfg),
                    "upstream": {u: keys[u] for u in stage.upstream}, "inputs": dataset_fingerprint(images),
                    "counts": counts, "skipped": ctx.skipped, "processes": share.world,
                    "seconds": round(time.perf_counter() - started, 3)}, uses=ctx.uses)
        distributed.barrier()  # the entry is there before any rank goes on to the next stage
        return counts
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # frees what this attempt wrote; finished per-image results stay
        raise StorageError(f"no space left on the device while stage {stage.name} wrote "
                           f"{exc.filename or 'its results'}; free some space and run the same command "
                           f"again: finished work is kept") from None


def _with_made_counts(counts: dict, made: list[dict]) -> dict:
    """Rank 0's counts of the whole share, with what every rank's share made added in (`computed`: the
    images computed by all the processes, not just the bad ones rank 0 tried again)."""
    return {name: value + sum(m.get(name, 0) for m in made) if isinstance(value, int) and any(name in m for m in made)
            else value for name, value in counts.items()}


def _quiet(*args, **kwargs) -> None:
    pass


def status(workdir: str | Path) -> list[dict]:
    """Each stage, in the run that evaluate, export and report would read for it (the newest that reached
    it), against the images folder as it is now: cached / damaged / stale / missing. Reads only."""
    wd = Workdir(Path(workdir))
    wd.runs()  # a clear error for a folder that holds no run
    rows, keys_of = [], {}
    for stage in STAGES:
        try:
            record = wd.last_run(stage.name)
        except InputError:
            rows.append({"stage": stage.name, "status": "missing", "key": "", "bytes": None, "seconds": None,
                         "finished": None})
            continue
        if id(record) not in keys_of:
            cfg = load_config_dict(record["config"])
            keys_of[id(record)] = stage_keys(cfg, scan_images(record["images"], cfg.hash_content)[0])
        key = keys_of[id(record)][stage.name]
        row = {"stage": stage.name, "key": key, "bytes": None, "seconds": None, "finished": None,
               "run": record.get("finished")}
        if (wd.store.entry(stage.name, key) / MANIFEST).is_file():
            if wd.store.verify(stage.name, key):
                row["status"] = "damaged"  # `run` repairs it
            else:
                manifest = wd.store.manifest(stage.name, key)
                row.update(status="cached", bytes=wd.store.size_bytes(stage.name, key),
                           seconds=manifest.get("seconds"), finished=manifest.get("finished"))
        else:
            row["status"] = "stale" if wd.store.finished_keys(stage.name) else "missing"
        rows.append(row)
    return rows


def _print_left_out(left_out: list[dict], listed_in: Path) -> None:
    """Every file the scan does not use, on the console as the stages print the images they skip."""
    for entry in left_out[:SHOWN_LEFT_OUT]:
        print(f"skipped {entry['image']}: {entry['reason']}", file=sys.stderr)
    if len(left_out) > SHOWN_LEFT_OUT:
        print(f"skipped {len(left_out) - SHOWN_LEFT_OUT} more files (all listed in {listed_in})", file=sys.stderr)


def _summary(counts: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in counts.items() if not isinstance(v, (list, dict)))
