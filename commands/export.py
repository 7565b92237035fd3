"""Export: the pseudo-label dataset as a folder a segmentation or detection trainer reads as is.

Both formats:
  images/<id>.jpg      the photo as the pipeline saw it (original bytes when nothing needed decoding); <id> is its
                       relative path without suffix, made safe for list files (see export_id)
  train.txt, val.txt   one <id> per line (VOC ImageSets style); an image is in val when
                       int(sha256(id), 16) % 100 < 10: a fixed 10% that does not move when photos are added
  meta.json            classes and cluster names, exported clusters, split, config, artifact keys, counts,
                       image_of_id (each id's original image name)
`voc` adds masks/<id>.png: palette PNGs, 0 background, classes 1..n, 255 ignore.
`coco` adds annotations.json: one annotation per object of the objects stage (RLE mask, bbox, area,
category_id = its class); objects the cluster stage left as ignore have no category and are left out.
The classes come from names.yaml (pipeline.names.classes_of): without it, class = cluster id + 1; clusters
with one name are one class, numbered in order of their first cluster id; `ignore` sends a cluster to 255,
`background` to 0. meta.json's class_of_cluster maps every cluster id to its class.
`clusters` exports only those clusters: in masks the others' pixels become 255, in COCO their objects are
dropped; the classes are not renumbered, so one names.yaml gives the same numbers with or without it.
The folder is written under a temporary name and renamed when complete; an existing one is never touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
import pycocotools.mask
from PIL import Image
from tqdm import tqdm

from pipeline.artifacts import temp_dir_beside, write_json
from pipeline.errors import CacheCorruptError, InputError
from pipeline.images import BadImage, load_rgb, read_label_png, stem_of, write_label_png
from pipeline.names import check_clusters, classes_of, load_names
from pipeline.outputs import IGNORE, class_count, cluster_sizes, load_objects, object_file, read_items
from pipeline.runner import Workdir

EXIF_ORIENTATION = 0x0112
FORMATS = ("voc", "coco")
VAL_PERCENT = 10
SAFE_ID = re.compile(r"[A-Za-z0-9._/-]+")


def export_workdir(workdir: Path, to: Path, fmt: str = "voc", clusters: Sequence[int] | None = None,
                   names: Path | None = None) -> dict:
    """Write the last run's pseudo labels to the new folder `to`; returns its meta.json."""
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r} (formats: {', '.join(FORMATS)})")
    wd, to = Workdir(Path(workdir)), Path(to)
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise InputError(f"export folder {to} already exists and is not empty; choose another --to")
    state = wd.last_run("pseudo_masks")
    entry = wd.latest_entry("pseudo_masks", state)
    k = class_count(entry) - 1
    cluster_names = load_names(names, k) if names else {}
    classes = classes_of(k, cluster_names)
    class_of_value = classes.value_map()
    chosen = check_clusters(clusters, k) if clusters is not None else list(range(k))
    items = read_items(entry)
    objects_keys = {i["image"]: i["objects_key"] for i in read_items(wd.latest_entry("embed", state))}
    images_root = Path(state["images"])
    tmp = temp_dir_beside(to)
    ids, sources, reencoded, coco_images, annotations = [], {}, 0, [], []
    try:
        for item in tqdm(items, desc=f"export {fmt}", disable=None, leave=False):
            image_id = export_id(item["image"])
            target = tmp / "images" / f"{image_id}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            reencoded += _write_image(images_root / item["image"], target)
            mask = read_label_png(entry / item["mask"])
            if fmt == "voc":
                write_label_png(tmp / "masks" / f"{image_id}.png", class_of_value[keep_clusters(mask, chosen, k)])
            else:
                number = len(coco_images) + 1
                coco_images.append({"id": number, "file_name": f"{image_id}.jpg", "height": mask.shape[0],
                                    "width": mask.shape[1]})
                object_map = load_objects(object_file(wd.store, objects_keys[item["image"]]))[0]
                annotations += object_annotations(object_map, mask, set(chosen), class_of_value, number,
                                                  len(annotations) + 1)
            ids.append(image_id)
            sources[image_id] = item["image"]
        val = [i for i in ids if in_val(i)]
        (tmp / "train.txt").write_text("".join(f"{i}\n" for i in ids if not in_val(i)))
        (tmp / "val.txt").write_text("".join(f"{i}\n" for i in val))
        if fmt == "coco":
            exported = sorted({classes.of_cluster[c] for c in chosen} - {0, IGNORE})
            categories = [{"id": v, "name": classes.names[v], "supercategory": "cluster"} for v in exported]
            coco = {"info": {"description": "objseg pseudo labels; category ids as in meta.json's class_of_cluster"},
                    "images": coco_images, "annotations": annotations, "categories": categories}
            (tmp / "annotations.json").write_text(json.dumps(coco))
        meta = {"format": fmt, "num_classes": len(classes.names), "ignore_index": IGNORE, "classes": list(classes.names),
                "class_of_cluster": {str(c): v for c, v in enumerate(classes.of_cluster)},
                "names": {str(c): n for c, n in sorted(cluster_names.items())}, "clusters": chosen,
                "cluster_sizes": cluster_sizes(wd.latest_entry("cluster", state)),
                "split": {"rule": f"val when int(sha256(id), 16) % 100 < {VAL_PERCENT}",
                          "train": len(ids) - len(val), "val": len(val)},
                "images": len(ids), "reencoded_images": reencoded, "source_images": str(images_root),
                "image_of_id": sources,
                "artifact_keys": state["keys"], "config": state["config"]}
        if fmt == "coco":
            meta["annotations"] = len(annotations)
        write_json(tmp / "meta.json", meta)
        if to.exists():
            to.rmdir()  # empty, checked above
        os.rename(tmp, to)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def export_id(image: str) -> str:
    """The image's name in the export: its relative path without suffix when that is plain ASCII letters,
    digits and `._-/` (trainers split list files on whitespace and some choke on other bytes), else that
    path with every other character as `_` and a hash of the original; meta.json maps ids back to images.
    Never a name that leaves the folder."""
    stem = stem_of(image)
    parts = PurePosixPath(stem).parts
    if not parts or stem.startswith("/") or "\\" in stem or any(p in (".", "..") for p in parts):
        raise InputError(f"image name {image!r} would be written outside the export folder; rename the photo")
    if SAFE_ID.fullmatch(stem):
        return stem
    digest = hashlib.sha256(stem.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._/-]', '_', stem)}-{digest}"


def in_val(image_id: str) -> bool:
    return int(hashlib.sha256(image_id.encode()).hexdigest(), 16) % 100 < VAL_PERCENT


def keep_clusters(mask: np.ndarray, chosen: list[int], k: int) -> np.ndarray:
    """The mask with every cluster outside `chosen` turned to ignore; background and ignore unchanged."""
    if len(chosen) == k:
        return mask
    keep = np.zeros(256, bool)
    keep[[0, IGNORE, *(c + 1 for c in chosen)]] = True
    return np.where(keep[mask], mask, IGNORE).astype(np.uint8)


def object_annotations(object_map: np.ndarray, mask: np.ndarray, chosen: set[int], class_of_value: np.ndarray,
                       image_number: int, first_id: int) -> list[dict]:
    """COCO annotations of one image's objects, each with the class of the cluster its pixels carry in the
    pseudo mask; objects of ignore, of background and of clusters not chosen are left out."""
    if object_map.shape != mask.shape:
        raise CacheCorruptError(f"object map {object_map.shape} and pseudo mask {mask.shape} of image {image_number} differ")
    annotations = []
    for object_id in range(1, int(object_map[object_map != IGNORE].max(initial=0)) + 1):
        pixels = object_map == object_id
        values = np.unique(mask[pixels]).tolist()
        if len(values) != 1:
            raise CacheCorruptError(f"object {object_id} of image {image_number} has pseudo labels {values}")
        category = int(class_of_value[values[0]])
        if values[0] == IGNORE or values[0] - 1 not in chosen or category in (0, IGNORE):
            continue
        rle = pycocotools.mask.encode(np.asfortranarray(pixels.astype(np.uint8)))
        annotations.append({"id": first_id + len(annotations), "image_id": image_number, "category_id": category,
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                            "area": int(pycocotools.mask.area(rle)),
                            "bbox": [float(v) for v in pycocotools.mask.toBbox(rle)], "iscrowd": 0})
    return annotations


def _write_image(source: Path, target: Path) -> int:
    """Copy a plain RGB JPEG as is; decode anything else (EXIF rotation, PNG, CMYK, ...) and save a JPEG. 1 if re-encoded."""
    try:
        with Image.open(source) as image:
            plain = image.format == "JPEG" and image.mode == "RGB" and image.getexif().get(EXIF_ORIENTATION, 1) == 1
        if plain:
            shutil.copyfile(source, target)
            return 0
        Image.fromarray(load_rgb(source)).save(target, format="JPEG", quality=95)
        return 1
    except (OSError, BadImage) as exc:
        raise InputError(f"{source}: cannot export this image ({exc}); was it changed after the run?") from None
