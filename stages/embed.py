"""Embed: a frozen self-supervised backbone turns each object crop into one L2-normalised vector.

Crops are cut and resized in DataLoader workers; the backbone runs in `eval()` under
`inference_mode` (AMP on GPU). Vectors stream to `.npy` shards of `shard_images` images, each
shard finished before the next starts, so memory does not grow with the dataset and a killed run
resumes at the first unfinished shard. The entry then gathers the rows of its images into
`embeddings.npy` (memory-mapped, streamed) with `objects.npz` saying which image and object each row is.
"""
from __future__ import annotations

import contextlib
import dataclasses

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.artifacts import read_json, save_npy, stable_hash, write_json
from pipeline.backbones import build_backbone, resolve_weights, weights_key
from pipeline.context import Context, item_key, write_items
from pipeline.errors import ConfigError
from pipeline.images import decoded
from stages.objects import load_objects, object_file

VERSION = 1


@dataclasses.dataclass(frozen=True)
class Params:
    batch_size: int = 64  # crops per forward pass
    shard_images: int = 256  # images per shard: the unit of resumption

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.shard_images < 1:
            raise ConfigError(f"shard_images must be >= 1, got {self.shard_images}")


def key_params(cfg) -> dict:
    # batch_size and shard_images change how the work is cut, not the vectors (inference is per crop)
    return {"backbone": weights_key(cfg.backbone), "crop_size": cfg.objects.crop_size}


def check(ctx: Context, params: Params) -> None:
    resolve_weights(ctx.cfg.backbone)


def run(ctx: Context, params: Params) -> dict:
    kp = key_params(ctx.cfg)
    records = {r.rel: r for r in ctx.images}
    items = [{"image": e["image"], "key": item_key("embed", VERSION, kp, e["key"]), "objects_key": e["key"],
              "objects": e["objects"]} for e in ctx.upstream_items("objects")]
    shards = ctx.store.items("embed")
    done = _finished_rows(shards)
    pending = [i for i in items if i["key"] not in done and i["objects"] > 0]
    backbone = build_backbone(ctx.cfg.backbone).to(ctx.device) if pending else None
    crops = decoded([records[i["image"]].path for i in pending],
                    _CropBoxes([object_file(ctx.store, i["objects_key"]) for i in pending], ctx.cfg.objects.crop_size),
                    workers=ctx.cfg.workers)
    outputs, chunk, counts, waiting, seen = [], [], [], [], 0
    for index, image_crops, reason in ctx.progress(crops, "embed", total=len(pending)):
        seen += 1
        if image_crops is None:  # decoded by saliency earlier; changed or unreadable since. Not a result: not cached
            ctx.skip(pending[index]["image"], reason)
        else:
            chunk.append(pending[index])
            counts.append(len(image_crops))
            waiting.append(image_crops)
        # Batches never span two shards, so a resumed shard sees exactly the batches it would have.
        shard_done = seen == params.shard_images or index == len(pending) - 1
        while sum(map(len, waiting)) >= params.batch_size or (shard_done and sum(map(len, waiting))):
            batch = torch.cat([w for w in waiting if len(w)])
            outputs.append(_forward(backbone, batch[:params.batch_size], ctx.device))
            waiting = [batch[params.batch_size:]]
        if shard_done and chunk:
            vectors = np.concatenate(outputs) if outputs else np.zeros((0, backbone.dim), np.float32)
            shard_id = stable_hash([i["key"] for i in chunk])
            save_npy(shards / f"{shard_id}.npy", vectors)
            write_json(shards / f"{shard_id}.json", {"items": [[i["key"], n] for i, n in zip(chunk, counts)]})  # last: marks it finished
            done.update(_shard_rows(shards / f"{shard_id}.json"))
        if shard_done:
            outputs, chunk, counts, waiting, seen = [], [], [], [], 0
    kept = [i for i in items if i["objects"] == 0 or i["key"] in done]
    rows = _gather(ctx, shards, kept, done)
    write_items(ctx.out, [{"image": i["image"], "key": i["key"], "objects_key": i["objects_key"]} for i in kept])
    return {"images": len(kept), "objects": rows, "computed_images": len(pending)}


@torch.inference_mode()
def _forward(backbone, crops: torch.Tensor, device: torch.device) -> np.ndarray:
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        vectors = backbone(crops.to(device, non_blocking=True))
    return F.normalize(vectors.float(), dim=1).cpu().numpy()


class _CropBoxes:
    """Cuts each box out of the decoded image and resizes it to a square crop (runs in the workers)."""

    def __init__(self, object_files: list, size: int):
        self.object_files, self.size = object_files, size

    def __call__(self, index: int, rgb: np.ndarray) -> torch.Tensor:
        crops = []
        for x0, y0, x1, y1 in load_objects(self.object_files[index])[1]:
            crop = rgb[y0:y1, x0:x1]
            shrink = crop.shape[0] > self.size or crop.shape[1] > self.size
            crops.append(cv2.resize(crop, (self.size, self.size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR))
        return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


def _finished_rows(shards) -> dict[str, tuple[str, int, int]]:
    """item key -> (shard id, first row, row count), over every finished shard (those with their .json)."""
    done = {}
    if shards.is_dir():
        for index_file in sorted(shards.glob("*.json")):
            done.update(_shard_rows(index_file))
    return done


def _shard_rows(index_file) -> dict[str, tuple[str, int, int]]:
    rows, start = {}, 0
    for key, count in read_json(index_file)["items"]:
        rows[key] = (index_file.stem, start, count)
        start += count
    return rows


def _gather(ctx, shards, kept, done) -> int:
    """Stream every kept image's rows from the shards into one memory-mapped array, in image order."""
    total = sum(done[i["key"]][2] for i in kept if i["key"] in done)
    dim = _dim(shards, done) if total else 0
    array = np.lib.format.open_memmap(ctx.out / "embeddings.npy", mode="w+", dtype=np.float32, shape=(total, dim))
    image_index = np.zeros(total, np.int32)
    object_id = np.zeros(total, np.int32)
    opened, row = {}, 0
    for position, item in enumerate(kept):
        if item["key"] not in done:
            continue
        shard_id, start, count = done[item["key"]]
        if shard_id not in opened:
            opened[shard_id] = np.load(shards / f"{shard_id}.npy", mmap_mode="r")
            ctx.uses += [shards / f"{shard_id}.npy", shards / f"{shard_id}.json"]
        array[row:row + count] = opened[shard_id][start:start + count]
        image_index[row:row + count] = position
        object_id[row:row + count] = np.arange(1, count + 1)
        row += count
    array.flush()
    del array
    np.savez(ctx.out / "objects.npz", image_index=image_index, object_id=object_id)
    return total


def _dim(shards, done) -> int:
    shard_id = next(iter(done.values()))[0]
    return int(np.load(shards / f"{shard_id}.npy", mmap_mode="r").shape[1])
