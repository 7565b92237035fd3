"""Objects: split each foreground mask into objects and box each one with a little context.

Each connected component of the mask that covers at least `min_area` of the image is an object;
its box grows by `margin` of its size on every side (clipped to the image), and the embed stage
crops and resizes it to `crop_size`. COMUS takes one box over all salient pixels instead
(`one_box_per_image=true`). Salient pixels of components too small to keep are marked ignore (255),
so the pseudo masks neither call them background nor give them a class.
"""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import cv2
import numpy as np

from pipeline.artifacts import atomic_write
from pipeline.context import Context, item_key, write_items
from pipeline.errors import CacheCorruptError, ConfigError
from stages.saliency import mask_file

VERSION = 1
IGNORE = 255


@dataclasses.dataclass(frozen=True)
class Params:
    min_area: float = 0.005  # fraction of the image a component must cover to be an object
    margin: float = 0.1  # context added on each side of a box, as a fraction of its width / height
    crop_size: int = 224
    max_objects: int = 32  # per image, the largest are kept (object ids must fit in uint8)
    one_box_per_image: bool = False  # COMUS: a single object over all salient pixels

    def __post_init__(self):
        if not 0.0 <= self.min_area < 1.0:
            raise ConfigError(f"min_area must be in [0, 1), got {self.min_area}")
        if self.margin < 0:
            raise ConfigError(f"margin must be >= 0, got {self.margin}")
        if self.crop_size < 16:
            raise ConfigError(f"crop_size must be >= 16, got {self.crop_size}")
        if not 1 <= self.max_objects < IGNORE:
            raise ConfigError(f"max_objects must be in [1, {IGNORE - 1}], got {self.max_objects}")


def key_params(cfg) -> dict:
    # crop_size only matters to embed, which has it in its own key
    return {k: v for k, v in dataclasses.asdict(cfg.objects).items() if k != "crop_size"}


def run(ctx: Context, params: Params) -> dict:
    items, computed, total_objects = [], 0, 0
    kp = key_params(ctx.cfg)
    for entry in ctx.progress(ctx.upstream_items("saliency"), "objects"):
        key = item_key("objects", VERSION, kp, entry["key"])
        path = object_file(ctx.store, key)
        if path.is_file():
            count = len(load_objects(path)[1])
        else:
            object_map, boxes = find_objects(_read_mask(mask_file(ctx.store, entry["key"])), params)
            _save(path, object_map, boxes)
            computed, count = computed + 1, len(boxes)
        total_objects += count
        items.append({"image": entry["image"], "key": key, "objects": count})
        ctx.uses.append(path)
    write_items(ctx.out, items)
    return {"images": len(items), "computed": computed, "objects": total_objects}


def find_objects(mask: np.ndarray, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """(object map, boxes): map pixels are 0 background, i for object i (1-based), 255 salient but too small;
    boxes[i - 1] = (x0, y0, x1, y1), end-exclusive, context margin included."""
    height, width = mask.shape
    salient = (mask > 0).astype(np.uint8)
    object_map = np.where(salient > 0, IGNORE, 0).astype(np.uint8)
    min_pixels = params.min_area * height * width
    if params.one_box_per_image:
        components = [salient.astype(bool)] if salient.sum() >= max(min_pixels, 1) else []
    else:
        count, labels, stats, _ = cv2.connectedComponentsWithStats(salient, connectivity=8)
        kept = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= max(min_pixels, 1)]
        kept = sorted(sorted(kept, key=lambda i: -stats[i, cv2.CC_STAT_AREA])[:params.max_objects])
        components = [labels == i for i in kept]
    boxes = []
    for object_id, component in enumerate(components, start=1):
        object_map[component] = object_id
        ys, xs = np.nonzero(component)
        boxes.append(_with_margin(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, params.margin, width, height))
    return object_map, np.array(boxes, dtype=np.int32).reshape(-1, 4)


def _with_margin(x0, y0, x1, y1, margin, width, height):
    dx, dy = round((x1 - x0) * margin), round((y1 - y0) * margin)
    return max(0, x0 - dx), max(0, y0 - dy), min(width, x1 + dx), min(height, y1 + dy)


def object_file(store, key: str) -> Path:
    return store.items("objects") / f"{key}.npz"


def load_objects(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as data:
            return data["object_map"], data["boxes"]
    except (OSError, KeyError, ValueError) as exc:
        raise CacheCorruptError(f"cannot read cached objects {path}: {exc}; delete it to recompute") from None


def _save(path: Path, object_map: np.ndarray, boxes: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, object_map=object_map, boxes=boxes)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def _read_mask(path: Path) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise CacheCorruptError(f"cannot read cached saliency mask {path}; delete it to recompute")
    return mask
