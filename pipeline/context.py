"""What a stage sees while it runs: config, inputs, upstream entries, where to write, how to report."""
from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline import distributed
from pipeline.artifacts import ArtifactStore, stable_hash, write_json
from pipeline.config import RunConfig
from pipeline.errors import InputError
from pipeline.images import ImageRecord
from pipeline.outputs import ITEMS, read_items


@dataclasses.dataclass
class Context:
    cfg: RunConfig  # pipeline.runner.Config: these settings plus each stage's section, by stage name
    images: list[ImageRecord]
    store: ArtifactStore
    out: Path  # the temporary folder of the entry being written
    upstream: dict[str, Path]  # finished entries of upstream stages, by stage name
    device: torch.device
    key: str = ""  # the key of the entry being written
    skipped: list[dict] = dataclasses.field(default_factory=list)
    uses: list[Path] = dataclasses.field(default_factory=list)  # per-image results the entry is made of (checksummed)
    # Under torchrun, per-image stages first `make` the results of each rank's share; then rank 0 `run`s
    # them with the whole share, where only what no rank could make (bad images) is tried again.
    share: distributed.Share = distributed.WHOLE

    def skip(self, rel: str, reason: str) -> None:
        """Record a bad input; with `strict`, stop at the first. A rank's share is quiet: rank 0 then
        meets every bad image again and reports each once."""
        if self.cfg.strict:
            raise InputError(f"{rel}: {reason} (strict mode stops at the first bad image)")
        if self.share.world == 1:
            tqdm.write(f"skipped {rel}: {reason}", file=sys.stderr)
        self.skipped.append({"image": rel, "reason": reason})

    def progress(self, iterable, desc: str, total: int | None = None, unit: str = "img"):
        """A progress bar on a terminal (tqdm turns itself off when output is not a TTY); under torchrun
        rank 0's alone, for its share, which the others' keep pace with."""
        if self.share.world > 1:
            if self.share.rank:
                return iterable
            desc = f"{desc} (rank 0 of {self.share.world})"
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=None, leave=False, dynamic_ncols=True)

    def in_share(self, rel: str) -> bool:
        """Whether this process makes the per-image results of image `rel` (by its index in the listing)."""
        return self.share.holds(self._index[rel])

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {r.rel: i for i, r in enumerate(self.images)}

    def rank_zero_first(self, make):
        """Once every rank got here, `make()` on rank 0 while the others wait, then on them, where it finds
        what rank 0 stored: a dataset-level result that the per-image work needs (the self-trained saliency
        head, learnt from every rank's seeds)."""
        if self.share.world == 1:
            return make()
        distributed.barrier()
        made = make() if self.share.rank == 0 else None
        distributed.barrier()
        return made if self.share.rank == 0 else make()

    def upstream_items(self, stage: str) -> list[dict]:
        return read_items(self.upstream[stage])


def item_key(stage: str, version: int, params, parent: str) -> str:
    """Key of one image's result in a per-image stage: its parameters and its parent (image fingerprint
    or upstream item key), so a changed folder reuses every unchanged image's work."""
    return stable_hash({"stage": stage, "version": version, "params": params, "parent": parent})


def write_items(out: Path, items: list[dict]) -> None:
    """Per-image stages list which per-image results (in input order) make up their entry."""
    write_json(out / ITEMS, items)
