"""Objects: split each foreground mask into objects and box each one with a little context.

Each connected component of the mask that covers at least `min_area` of the image is an object;
its box grows by `margin` of its size on every side (clipped to the image), and the embed stage
crops and resizes it to `crop_size`. COMUS takes one box over all salient pixels instead
(`one_box_per_image=true`). With `refine` (pipeline/refine.py), the objects' borders then move to
the photo's colour edges; an object the refinement leaves with no pixel is dropped. Salient
components too small to be objects are, by `small_components`, left as ignore (255: the pseudo
masks neither call them background nor give them a class), joined to the object nearest to each
of their pixels, or made background.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import scipy.ndimage

from pipeline.context import Context, item_key, write_items
from pipeline.errors import ConfigError
from pipeline.images import decoded
from pipeline.outputs import IGNORE, load_objects, mask_file, object_file, read_mask, save_objects
from pipeline.refine import RefineParams, refine_labels

VERSION = 1
SMALL_COMPONENTS = ("ignore", "nearest", "background")


@dataclasses.dataclass(frozen=True)
class Params:
    min_area: float = 0.005  # fraction of the image a component must cover to be an object
    margin: float = 0.1  # context added on each side of a box, as a fraction of its width / height
    crop_size: int = 224
    max_objects: int = 32  # per image, the largest are kept (object ids must fit in uint8)
    one_box_per_image: bool = False  # COMUS: a single object over all salient pixels
    small_components: str = "ignore"  # salient pixels of no object: ignore | nearest (object) | background
    refine: RefineParams = RefineParams()  # object borders snapped to the photo's colour edges

    def __post_init__(self):
        if not 0.0 <= self.min_area < 1.0:
            raise ConfigError(f"min_area must be in [0, 1), got {self.min_area}")
        if self.margin < 0:
            raise ConfigError(f"margin must be >= 0, got {self.margin}")
        if self.crop_size < 16:
            raise ConfigError(f"crop_size must be >= 16, got {self.crop_size}")
        if not 1 <= self.max_objects < IGNORE:
            raise ConfigError(f"max_objects must be in [1, {IGNORE - 1}], got {self.max_objects}")
        if self.small_components not in SMALL_COMPONENTS:
            raise ConfigError(f"small_components must be one of {', '.join(SMALL_COMPONENTS)}, got {self.small_components!r}")


def key_params(cfg) -> dict:
    # crop_size only matters to embed, which has it in its own key; settings that do what version 1
    # did (small components ignored, no refinement) are left out, so keys made before them stay valid
    params = {k: v for k, v in dataclasses.asdict(cfg.objects).items() if k != "crop_size"}
    if params["small_components"] == "ignore":
        del params["small_components"]
    if params["refine"]["method"] == "none":
        del params["refine"]
    return params


def run(ctx: Context, params: Params) -> dict:
    entries, keys, failed, computed = _made(ctx, params)
    items, total_objects = [], 0
    for index, (entry, key) in enumerate(zip(entries, keys)):
        if index in failed:
            continue
        count = len(load_objects(object_file(ctx.store, key))[1])
        total_objects += count
        items.append({"image": entry["image"], "key": key, "objects": count})
        ctx.uses.append(object_file(ctx.store, key))
    write_items(ctx.out, items)
    return {"images": len(items), "computed": computed, "objects": total_objects}


def make(ctx: Context, params: Params) -> dict:
    """Store the objects of the images in `ctx.share` that have none yet; what was computed, counted."""
    return {"computed": _made(ctx, params)[3]}


def _made(ctx: Context, params: Params) -> tuple[list[dict], list[str], set[int], int]:
    """(the share's saliency items, their objects keys, positions of those that failed, how many were made),
    making the objects not stored yet."""
    kp = key_params(ctx.cfg)
    entries = [e for e in ctx.upstream_items("saliency") if ctx.in_share(e["image"])]
    keys = [item_key("objects", VERSION, kp, e["key"]) for e in entries]
    pending = [i for i, key in enumerate(keys) if not object_file(ctx.store, key).is_file()]
    failed = set()
    for position, found, reason in ctx.progress(_found_objects(ctx, params, [entries[i] for i in pending]),
                                                "objects", total=len(pending)):
        index = pending[position]
        if found is None:  # the photo, needed for refinement, changed or became unreadable since saliency
            ctx.skip(entries[index]["image"], reason)
            failed.add(index)
        else:
            save_objects(object_file(ctx.store, keys[index]), *found)
    return entries, keys, failed, len(pending) - len(failed)


def _found_objects(ctx: Context, params: Params, entries: list[dict]):
    """(position, (object map, boxes) or None, reason) for each entry; the photos are decoded (in the
    workers) only when refinement needs them."""
    masks = [mask_file(ctx.store, e["key"]) for e in entries]
    if params.refine.method == "none":
        return ((i, find_objects(read_mask(path), params), None) for i, path in enumerate(masks))
    records = {r.rel: r for r in ctx.images}
    return decoded([records[e["image"]].path for e in entries], _FindObjects(masks, params), workers=ctx.cfg.workers)


class _FindObjects:
    """find_objects on an entry's mask with its decoded photo (runs in the workers)."""

    def __init__(self, masks: list[Path], params: Params):
        self.masks, self.params = masks, params

    def __call__(self, index: int, rgb: np.ndarray):
        return find_objects(read_mask(self.masks[index]), self.params, rgb)


def find_objects(mask: np.ndarray, params: Params, rgb: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(object map, boxes): map pixels are 0 background, i for object i (1-based), 255 salient but too small
    (unless `small_components` places them); boxes[i - 1] = (x0, y0, x1, y1), end-exclusive, context margin
    included, around object i's own pixels. `rgb` (the photo) is needed when `params.refine` is on."""
    object_map = _components(mask, params)
    if params.refine.method != "none":
        if rgb is None or rgb.shape[:2] != mask.shape:
            raise ValueError(f"refinement needs the photo at the mask's size {mask.shape}")
        object_map = _renumbered(refine_labels(rgb, object_map, params.refine))
    height, width = mask.shape
    boxes = []
    for object_id in range(1, int(object_map[object_map != IGNORE].max(initial=0)) + 1):
        ys, xs = np.nonzero(object_map == object_id)
        boxes.append(_with_margin(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, params.margin, width, height))
    return _place_small_components(object_map, params.small_components), np.array(boxes, dtype=np.int32).reshape(-1, 4)


def _components(mask: np.ndarray, params: Params) -> np.ndarray:
    """0 background, 1..n the components large enough to be objects (the largest `max_objects`), 255 the rest."""
    height, width = mask.shape
    salient = (mask > 0).astype(np.uint8)
    object_map = np.where(salient > 0, IGNORE, 0).astype(np.uint8)
    min_pixels = max(params.min_area * height * width, 1)
    if params.one_box_per_image:
        if salient.sum() >= min_pixels:
            object_map[salient > 0] = 1
        return object_map
    count, labels, stats, _ = cv2.connectedComponentsWithStats(salient, connectivity=8)
    kept = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= min_pixels]
    kept = sorted(sorted(kept, key=lambda i: -stats[i, cv2.CC_STAT_AREA])[:params.max_objects])
    for object_id, component in enumerate(kept, start=1):
        object_map[labels == component] = object_id
    return object_map


def _renumbered(object_map: np.ndarray) -> np.ndarray:
    """Object ids made consecutive again, in their order, after refinement removed some; 0 and 255 kept."""
    lut = np.arange(256, dtype=np.uint8)
    present = [v for v in np.unique(object_map) if v not in (0, IGNORE)]
    lut[present] = np.arange(1, len(present) + 1)
    return lut[object_map]


def _place_small_components(object_map: np.ndarray, policy: str) -> np.ndarray:
    small = object_map == IGNORE
    if policy == "ignore" or not small.any():
        return object_map
    placed = object_map.copy()
    is_object = (object_map != 0) & ~small
    if policy == "background":
        placed[small] = 0
    elif is_object.any():  # nearest: each pixel joins the object whose nearest pixel is closest to it
        rows, cols = scipy.ndimage.distance_transform_edt(~is_object, return_distances=False, return_indices=True)
        placed[small] = object_map[rows[small], cols[small]]
    return placed


def _with_margin(x0, y0, x1, y1, margin, width, height):
    dx, dy = round((x1 - x0) * margin), round((y1 - y0) * margin)
    return max(0, x0 - dx), max(0, y0 - dy), min(width, x1 + dx), min(height, y1 + dy)


