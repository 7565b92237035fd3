"""What each stage hands on: its output files and their formats, with one reader each.

A stage reads another stage's results only through this module, and so do the commands (evaluate,
export, report), so a stage can change how it computes its outputs without breaking whoever reads
them. An entry is the folder `cache/<stage>/<key>/`; per-image results live in `cache/<stage>/items/`.

- every entry: `manifest.json` (written last, by the runner); its `counts` are what the stage returned.
- saliency: per image, `items/<key>.png`, 8-bit, 0 background / 255 foreground, at image size.
- objects: per image, `items/<key>.npz`: `object_map` (uint8 at image size: 0 background, i object i,
  IGNORE salient pixels of no object) and `boxes` (int32, one x0 y0 x1 y1 row per object, with margin).
- embed: `embeddings.npy` (float32, one L2-normalised row per object) and `objects.npz` (`image_index`,
  `object_id` per row; rows grouped by image in item order).
- cluster: `assignments.npy` (cluster per row), `distances.npy` (to its centroid), `core.npy` (bool:
  kept, not ignored), `centroids.npy`; `counts.cluster_sizes` (objects per cluster, k of them).
- pseudo_masks, train: `masks/<stem>.png` label PNGs (0 background, cluster + 1, IGNORE); `counts.classes`.
- train: `latest.pt`, `best.pt` (self-describing checkpoints, see pipeline/segmenter.py), `round<N>.pt`
  (each earlier self-training round's final network), `train_log.csv`.
- per-image stages, pseudo_masks and train: `items.json`, the entry's items in input order.
"""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import cv2
import numpy as np

from pipeline.artifacts import MANIFEST, atomic_write, read_json
from pipeline.errors import CacheCorruptError

IGNORE = 255  # the label value nothing is learnt from or scored on: ignored objects, unlabelled pixels
ITEMS = "items.json"
EMBEDDINGS = "embeddings.npy"
EMBEDDING_ROWS = "objects.npz"
TRAIN_LOG = "train_log.csv"


def read_items(entry: Path) -> list[dict]:
    """The items of an entry, in input order: {image, key, ...} for per-image stages, {image, mask} for masks."""
    return read_json(entry / ITEMS)


def _counts(entry: Path) -> dict:
    return read_json(entry / MANIFEST)["counts"]


def mask_file(store, key: str) -> Path:
    """Where the mask of the saliency item `key` is stored."""
    return store.items("saliency") / f"{key}.png"


def read_mask(path: Path) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise CacheCorruptError(f"cannot read cached saliency mask {path}; delete it to recompute")
    return mask


def object_file(store, key: str) -> Path:
    return store.items("objects") / f"{key}.npz"


def save_objects(path: Path, object_map: np.ndarray, boxes: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, object_map=object_map, boxes=boxes)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def load_objects(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(object_map, boxes) of one image."""
    try:
        with np.load(path) as data:
            return data["object_map"], data["boxes"]
    except (OSError, KeyError, ValueError) as exc:
        raise CacheCorruptError(f"cannot read cached objects {path}: {exc}; delete it to recompute") from None


def load_embeddings(entry: Path) -> np.ndarray:
    return np.load(entry / EMBEDDINGS)


def embedding_rows(entry: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image_index, object_id) of every embedding row: which item and which object of its map it is."""
    with np.load(entry / EMBEDDING_ROWS) as rows:
        return rows["image_index"], rows["object_id"]


@dataclasses.dataclass(frozen=True)
class Clusters:
    assignment: np.ndarray  # cluster id per embedding row
    distance: np.ndarray  # to the row's centroid
    core: np.ndarray  # False where the row is ignored


def save_clusters(entry: Path, centroids: np.ndarray, clusters: Clusters) -> None:
    np.save(entry / "centroids.npy", centroids)
    np.save(entry / "assignments.npy", clusters.assignment)
    np.save(entry / "distances.npy", clusters.distance)
    np.save(entry / "core.npy", clusters.core)


def load_clusters(entry: Path) -> Clusters:
    return Clusters(np.load(entry / "assignments.npy"), np.load(entry / "distances.npy"), np.load(entry / "core.npy"))


def cluster_sizes(entry: Path) -> list[int]:
    """Objects per cluster, one number for each of the k clusters."""
    return _counts(entry)["cluster_sizes"]


def class_count(entry: Path) -> int:
    """How many label values (background included, IGNORE not) a pseudo_masks or train entry's masks use."""
    return _counts(entry)["classes"]
