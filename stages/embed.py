"""Embed: a frozen self-supervised backbone turns each object crop into one L2-normalised vector.

The vector describes the object rather than its box: each of the `views` of the crop is embedded
(`context`: the box as cut, margin included; `grey`: pixels of no object greyed out; `blur`: those
pixels blurred, keeping the scene's colours but not its shapes), and with `flip` each view mirrored
too; the views' vectors are averaged. `pooling` says what of the last feature map each view gives:
`crop` its average over the whole crop (CNNs; ViTs: the CLS token), `object` its average over the
object's own cells (mask pooling, as mask-based segmenters such as ODISE pool features; the cells have
seen the context), both by default, averaged as views are. With `layers` > 1 the vector joins the
pooled features of the trunk's last stages (earlier stages describe parts and textures the last one
abstracts away), each L2-normalised so that every stage counts alike.

Crops are cut and resized in DataLoader workers; the backbone runs in `eval()` under
`inference_mode` (AMP on GPU). Vectors stream to `.npy` shards of `shard_images` images, each
shard finished before the next starts, so memory does not grow with the dataset and a killed run
resumes at the first unfinished shard. The entry then gathers the rows of its images into
`embeddings.npy` (memory-mapped, streamed) with `objects.npz` saying which image and object each row is.
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.artifacts import read_json, save_npy, stable_hash, write_json
from pipeline.backbones import build_backbone, resolve_weights, weights_key
from pipeline.context import Context, item_key, write_items
from pipeline.errors import ConfigError, InputError
from pipeline.images import decoded
from pipeline.outputs import EMBEDDING_ROWS, EMBEDDINGS, load_objects, object_file
from pipeline.precision import autocast, device_in_key

VERSION = 1
VIEWS = ("context", "grey", "blur")
GREY = (124, 116, 104)  # ImageNet's mean colour: what the backbone's normalisation maps to zero
BLUR_SIGMA = 0.1  # of the crop's side: the background keeps its colours, loses its shapes
POOLINGS = ("crop", "object")
LEGACY = {"views": ("context",), "flip": False, "layers": 1, "pooling": ("crop",)}  # what version 1 computed


@dataclasses.dataclass(frozen=True)
class Params:
    batch_size: int = 64  # objects per forward pass (each brings one crop per view, two with flip)
    shard_images: int = 256  # images per shard: the unit of resumption
    views: tuple[str, ...] = ("context",)  # of each object, averaged: context | grey | blur
    flip: bool = False  # average each view with its mirror image
    layers: int = 1  # pooled features of this many of the trunk's last stages, concatenated
    pooling: tuple[str, ...] = ("crop", "object")  # of the last feature map, averaged: crop | object

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.shard_images < 1:
            raise ConfigError(f"shard_images must be >= 1, got {self.shard_images}")
        if not self.views or not set(self.views) <= set(VIEWS) or len(set(self.views)) < len(self.views):
            raise ConfigError(f"views must be distinct names from {', '.join(VIEWS)}, got {list(self.views)}")
        if self.layers < 1:
            raise ConfigError(f"layers must be >= 1, got {self.layers}")
        if not self.pooling or not set(self.pooling) <= set(POOLINGS) or len(set(self.pooling)) < len(self.pooling):
            raise ConfigError(f"pooling must be distinct names from {', '.join(POOLINGS)}, got {list(self.pooling)}")
        if self.layers > 1 and "object" in self.pooling:
            raise ConfigError("embed.layers > 1 pools whole stages: set embed.pooling=[crop] with it")


def key_params(cfg) -> dict:
    # batch_size and shard_images change how the work is cut, not the vectors (inference is per crop);
    # settings at version 1's behaviour are left out, so keys made before them stay valid
    chosen = {name: getattr(cfg.embed, name) for name in LEGACY if getattr(cfg.embed, name) != LEGACY[name]}
    return {"backbone": weights_key(cfg.backbone), "crop_size": cfg.objects.crop_size,
            **{name: list(value) if isinstance(value, tuple) else value for name, value in chosen.items()},
            **device_in_key(cfg.device)}  # float16 autocast on a GPU


def check(ctx: Context, params: Params) -> None:
    resolve_weights(ctx.cfg.backbone)


def run(ctx: Context, params: Params) -> dict:
    kept, done, computed = _made(ctx, params)
    rows = _gather(ctx, ctx.store.items("embed"), kept, done)
    write_items(ctx.out, [{"image": i["image"], "key": i["key"], "objects_key": i["objects_key"]} for i in kept])
    return {"images": len(kept), "objects": rows, "computed_images": computed}


def make(ctx: Context, params: Params) -> dict:
    """Store the vectors of the images in `ctx.share` that have none yet; what was computed, counted."""
    return {"computed_images": _made(ctx, params)[2]}


def _made(ctx: Context, params: Params) -> tuple[list[dict], dict, int]:
    """(the share's items with their vectors stored, the finished rows by item key, how many images were
    embedded), embedding those not stored yet."""
    kp = key_params(ctx.cfg)
    records = {r.rel: r for r in ctx.images}
    items = [{"image": e["image"], "key": item_key("embed", VERSION, kp, e["key"]), "objects_key": e["key"],
              "objects": e["objects"]} for e in ctx.upstream_items("objects") if ctx.in_share(e["image"])]
    shards = ctx.store.items("embed")
    done = _finished_rows(shards)
    pending = [i for i in items if i["key"] not in done and i["objects"] > 0]
    backbone = build_backbone(ctx.cfg.backbone).to(ctx.device) if pending else None
    if backbone is not None and params.layers > len(_stage_outputs(backbone)):
        raise ConfigError(f"embed.layers={params.layers}, but {backbone.name} has {len(_stage_outputs(backbone))} stages")
    crops = decoded([records[i["image"]].path for i in pending],
                    _CropViews([object_file(ctx.store, i["objects_key"]) for i in pending], ctx.cfg.objects.crop_size,
                               params.views),
                    workers=ctx.cfg.workers)
    outputs, counts, waiting = [], [], []
    for index, image_crops, reason in ctx.progress(crops, "embed", total=len(pending)):
        if image_crops is None:  # the saliency stage decoded it; it changed or became unreadable since.
            # A failure is not a result: nothing is cached for it, and the same command tries again.
            raise InputError(f"{pending[index]['image']}: {reason}, though the saliency stage read it; run the "
                             f"same command again (finished embeddings are kept)")
        counts.append(len(image_crops))
        waiting.append(image_crops)
        # Batches never span two shards, so a resumed shard sees exactly the batches it would have.
        shard_done = len(counts) == params.shard_images or index == len(pending) - 1
        while sum(map(len, waiting)) >= params.batch_size or (shard_done and sum(map(len, waiting))):
            batch = torch.cat([w for w in waiting if len(w)])
            outputs.append(_forward(backbone, batch[:params.batch_size], ctx.device, params))
            waiting = [batch[params.batch_size:]]
        if shard_done:
            chunk = pending[index + 1 - len(counts):index + 1]
            vectors = np.concatenate(outputs) if outputs else np.zeros((0, backbone.dim), np.float32)
            shard_id = stable_hash([i["key"] for i in chunk])
            save_npy(shards / f"{shard_id}.npy", vectors)
            write_json(shards / f"{shard_id}.json", {"items": [[i["key"], n] for i, n in zip(chunk, counts)]})  # last: marks it finished
            done.update(_shard_rows(shards / f"{shard_id}.json"))
            outputs, counts, waiting = [], [], []
    return [i for i in items if i["objects"] == 0 or i["key"] in done], done, len(pending)


@torch.inference_mode()
def _forward(backbone, crops: torch.Tensor, device: torch.device, params: Params) -> np.ndarray:
    """(objects, dim) unit vectors of (objects, views, 4, S, S) crops, RGB and the object's mask: each view
    (and its mirror) embedded as each pooling, the unit vectors averaged."""
    objects, views = crops.shape[:2]
    x = crops.flatten(0, 1).to(device, non_blocking=True)
    if params.flip:
        x = torch.cat([x, x.flip(-1)])
    images, masks = x[:, :3], x[:, 3] / 255.0
    with autocast(device):
        if params.layers > 1:
            pooled = [_stage_features(backbone, images, params.layers)]
        elif params.pooling == ("crop",):
            pooled = [backbone(images)]
        else:
            crop, inside = backbone.crop_and_object_vectors(images, masks)
            pooled = [{"crop": crop, "object": inside}[name] for name in params.pooling]
    vectors = torch.stack([F.normalize(v.float(), dim=1) for v in pooled])  # (poolings, flips x objects x views, dim)
    vectors = vectors.view(len(pooled), -1, objects, views, vectors.shape[-1]).mean(dim=(0, 1, 3))
    return F.normalize(vectors, dim=1).cpu().numpy()


def _stage_outputs(backbone) -> list:
    """The trunk's stage modules, last first: MobileNetV2's last conv and its blocks ending at 320, 96
    and 32 channels (strides 32, 32, 16, 8), ResNets' layer4 to layer1, ViTs' blocks."""
    trunk = backbone.trunk
    if backbone.family == "mobilenet_v2":
        return [trunk.features[i] for i in (18, 17, 13, 6)]
    if backbone.family == "resnet":
        return [trunk.layer4, trunk.layer3, trunk.layer2, trunk.layer1]
    return list(trunk.blocks)[::-1]


def _stage_features(backbone, x: torch.Tensor, layers: int) -> torch.Tensor:
    """The pooled outputs of the last `layers` stages (CNNs: spatial mean; ViTs: the normalised CLS token),
    each L2-normalised, concatenated in forward order."""
    captured = []
    hooks = [m.register_forward_hook(lambda module, inputs, out: captured.append(out))
             for m in _stage_outputs(backbone)[:layers]]
    try:
        backbone(x)
    finally:
        for hook in hooks:
            hook.remove()
    pooled = [backbone.trunk.norm(out)[:, 0] if backbone.family == "vit" else out.mean(dim=(2, 3)) for out in captured]
    return torch.cat([F.normalize(p.float(), dim=1) for p in pooled], dim=1)


class _CropViews:
    """Cuts each object's box out of the decoded image as each of `views`, resized to a square crop, with
    the object's mask (0 / 255) as a fourth channel; (objects, views, 4, size, size) uint8 (runs in the workers)."""

    def __init__(self, object_files: list, size: int, views: tuple[str, ...]):
        self.object_files, self.size, self.views = object_files, size, views

    def __call__(self, index: int, rgb: np.ndarray) -> torch.Tensor:
        object_map, boxes = load_objects(self.object_files[index])
        crops = []
        for object_id, (x0, y0, x1, y1) in enumerate(boxes, start=1):
            crop = rgb[y0:y1, x0:x1]
            inside = (object_map[y0:y1, x0:x1] == object_id)[..., None]
            mask = inside.astype(np.uint8) * 255
            crops.append([self._resized(np.concatenate([self._view(view, crop, inside), mask], axis=2))
                          for view in self.views])
        return torch.from_numpy(np.array(crops)).permute(0, 1, 4, 2, 3).contiguous()

    @staticmethod
    def _view(view: str, crop: np.ndarray, inside: np.ndarray) -> np.ndarray:
        if view == "context":
            return crop
        if view == "grey":
            return np.where(inside, crop, np.array(GREY, np.uint8))
        blurred = cv2.GaussianBlur(crop, (0, 0), BLUR_SIGMA * min(crop.shape[:2]) + 1e-3)
        return np.where(inside, crop, blurred)

    def _resized(self, crop: np.ndarray) -> np.ndarray:
        shrink = crop.shape[0] > self.size or crop.shape[1] > self.size
        return cv2.resize(crop, (self.size, self.size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


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
    dim = _dim(shards, done, kept) if total else 0
    array = np.lib.format.open_memmap(ctx.out / EMBEDDINGS, mode="w+", dtype=np.float32, shape=(total, dim))
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
    np.savez(ctx.out / EMBEDDING_ROWS, image_index=image_index, object_id=object_id)
    return total


def _dim(shards, done, kept) -> int:
    """The vectors' length, from a shard of this entry's own (other settings may be longer or shorter)."""
    shard_id = next(done[i["key"]][0] for i in kept if i["key"] in done)
    return int(np.load(shards / f"{shard_id}.npy", mmap_mode="r").shape[1])
