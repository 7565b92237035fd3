"""Export: the pseudo-label dataset as a folder a segmentation trainer reads as is.

  images/<id>.jpg   the photo as the pipeline saw it (original bytes when nothing needed decoding)
  masks/<id>.png    palette PNG: 0 background, 1..k clusters, 255 ignore
  train.txt         one <id> per line (VOC ImageSets style)
  meta.json         class count, ignore index, config, artifact keys, counts
The folder is written under a temporary name and renamed when complete; an existing one is never touched.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pipeline.artifacts import read_json, write_json
from pipeline.context import ITEMS
from pipeline.errors import InputError
from pipeline.images import BadImage, load_rgb, stem_of

EXIF_ORIENTATION = 0x0112


def export_workdir(workdir: Path, to: Path) -> dict:
    from pipeline.runner import Workdir

    wd, to = Workdir(Path(workdir)), Path(to)
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise InputError(f"export folder {to} already exists and is not empty; choose another --to")
    state = wd.state()
    entry = wd.latest_entry("pseudo_masks")
    items = read_json(entry / ITEMS)
    images_root = Path(state["images"])
    tmp = to.with_name(f"{to.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    ids, reencoded = [], 0
    try:
        for item in tqdm(items, desc="export", disable=None, leave=False):
            image_id = stem_of(item["image"])
            target = tmp / "images" / f"{image_id}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            reencoded += _write_image(images_root / item["image"], target)
            (tmp / "masks" / image_id).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(entry / item["mask"], tmp / "masks" / f"{image_id}.png")
            ids.append(image_id)
        (tmp / "train.txt").write_text("".join(f"{i}\n" for i in ids))
        classes = read_json(entry / "manifest.json")["counts"]["classes"]
        meta = {"num_classes": classes, "ignore_index": 255,
                "classes": ["background"] + [f"cluster_{c}" for c in range(classes - 1)],
                "images": len(ids), "reencoded_images": reencoded, "source_images": str(images_root),
                "artifact_keys": state["keys"], "config": state["config"]}
        write_json(tmp / "meta.json", meta)
        if to.exists():
            to.rmdir()  # empty, checked above
        os.rename(tmp, to)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


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
