"""Pseudo masks: each image's objects painted with their cluster, the training targets of the segmenter.

Background 0, object pixels cluster + 1, ignore 255 (objects outside their cluster's core, salient
components too small to be objects); 8-bit palette PNGs under `masks/`, named like the images.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from pipeline.context import Context, write_items
from pipeline.images import stem_of, write_label_png
from pipeline.outputs import IGNORE, embedding_rows, load_clusters, load_objects, object_file

VERSION = 1


@dataclasses.dataclass(frozen=True)
class Params:
    pass


def key_params(cfg) -> dict:
    return {}


def run(ctx: Context, params: Params) -> dict:
    items = ctx.upstream_items("embed")
    image_index, object_id = embedding_rows(ctx.upstream["embed"])
    clusters = load_clusters(ctx.upstream["cluster"])
    label_of_row = np.where(clusters.core, clusters.assignment + 1, IGNORE)
    # Rows are grouped by image in item order: one lookup table per image maps object id -> label.
    starts = np.searchsorted(image_index, np.arange(len(items) + 1))
    written = []
    for position, item in enumerate(ctx.progress(items, "pseudo_masks")):
        object_map, _ = load_objects(object_file(ctx.store, item["objects_key"]))
        lut = np.full(256, IGNORE, dtype=np.uint8)  # ids without a row (none expected) stay ignore
        lut[0] = 0
        first, last = starts[position], starts[position + 1]
        lut[object_id[first:last]] = label_of_row[first:last]
        name = f"masks/{stem_of(item['image'])}.png"
        write_label_png(ctx.out / name, lut[object_map])
        written.append({"image": item["image"], "mask": name})
    write_items(ctx.out, written)
    return {"images": len(written), "classes": ctx.cfg.cluster.k + 1}
