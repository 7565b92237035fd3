"""Evaluate: Hungarian-matched mIoU of predicted ids against ground-truth classes, over the whole dataset.

Predicted ids (background included) are matched one-to-one to ground-truth classes by maximising
the matched pixels of the dataset-level confusion (scipy's `linear_sum_assignment`), as the
unsupervised segmentation literature does. Ground-truth 255 is ignored. Pixels a prediction leaves
as ignore (255) count as wrong in `miou` (they are labelled nothing); `miou_labelled_only` leaves
them out. With more predicted ids than classes, majority voting (each id to its most frequent class)
is reported as well. Foreground IoU of the saliency masks is reported too. Ground-truth classes are
named from a names file in or beside the labels folder (see class_names), else VOC's names for 21 classes.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import cv2
import numpy as np
import yaml
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from pipeline.artifacts import write_json
from pipeline.errors import InputError
from pipeline.images import files_named_like, read_label_png
from pipeline.outputs import IGNORE, class_count, mask_file, read_items
from pipeline.runner import Workdir

VOC_CLASSES = 21  # PASCAL VOC: background + 20 classes
VOC_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
             "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
NAMES_FILES = ("names.txt", "classes.txt", "names.yaml")  # in the labels folder, or beside it


def class_names(labels_dir: Path, num_classes: int) -> list[str]:
    """The names of the label classes 0..num_classes-1 (background first): from the first of NAMES_FILES in the
    labels folder or beside it (a .txt: one name per line; names.yaml: a list, or `id: name` for every id),
    else VOC's names when there are 21 classes, else `class N`. InputError for a file that does not name
    exactly num_classes classes."""
    labels_dir = Path(labels_dir)
    for path in (folder / name for folder in (labels_dir, labels_dir.parent) for name in NAMES_FILES):
        if path.is_file():
            return _names_from(path, num_classes)
    return list(VOC_NAMES) if num_classes == VOC_CLASSES else [f"class {c}" for c in range(num_classes)]


def _names_from(path: Path, num_classes: int) -> list[str]:
    try:
        if path.suffix == ".txt":
            raw = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        else:
            raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read the label classes' names {path}: {exc}") from None
    if isinstance(raw, dict) and set(map(str, raw)) == {str(c) for c in range(num_classes)}:
        raw = [raw.get(c, raw.get(str(c))) for c in range(num_classes)]
    if not isinstance(raw, list) or len(raw) != num_classes or not all(isinstance(n, str) and n.strip() for n in raw):
        count = f"{len(raw)} entries" if isinstance(raw, (list, dict)) else type(raw).__name__
        raise InputError(f"{path} (the names of the label classes) must name the {num_classes} classes 0..{num_classes - 1}, "
                         f"background first; it has {count}; pass --classes N for N classes")
    return [n.strip() for n in raw]


def label_files(labels_dir: Path, images: list[str]) -> dict[str, Path]:
    """Each image's ground-truth file (see `files_named_like`)."""
    if not labels_dir.is_dir():
        raise InputError(f"labels folder not found: {labels_dir}")
    found = files_named_like(labels_dir, images)
    if not found:
        raise InputError(f"no label file in {labels_dir} matches any of the {len(images)} images (by file stem)")
    return found


def accumulate(confusion: np.ndarray, predicted: np.ndarray, truth: np.ndarray) -> None:
    """Add one image to a 256x256 confusion (rows: predicted id, columns: true class), true 255 skipped."""
    valid = truth != IGNORE
    confusion += np.bincount(predicted[valid].astype(np.int64) * 256 + truth[valid], minlength=256 * 256).reshape(256, 256)


def read_pair(predicted_path: Path, truth_path: Path) -> tuple[np.ndarray, np.ndarray]:
    predicted, truth = read_label_png(predicted_path), read_label_png(truth_path)
    if predicted.shape != truth.shape:
        raise InputError(f"{predicted_path} is {predicted.shape[1]}x{predicted.shape[0]} but its label "
                         f"{truth_path} is {truth.shape[1]}x{truth.shape[0]}")
    return predicted, truth


def scores(confusion: np.ndarray, num_predicted: int, num_classes: int) -> dict:
    """Hungarian (and, when over-clustered, majority-vote) metrics from a 256x256 confusion."""
    matched = confusion[:num_predicted, :num_classes].astype(np.float64)
    class_pixels = confusion[:, :num_classes].sum(axis=0).astype(np.float64)  # includes pixels predicted ignore
    rows, cols = linear_sum_assignment(matched, maximize=True)
    hungarian = dict(zip(rows.tolist(), cols.tolist()))
    result = {"hungarian": _iou_report(matched, class_pixels, hungarian),
              "hungarian_labelled_only": _iou_report(matched, matched.sum(axis=0), hungarian),
              "assignment": {str(r): int(c) for r, c in hungarian.items()},
              "predicted_ids": num_predicted, "classes": num_classes,
              "ignored_prediction_fraction": float(1 - matched.sum() / max(class_pixels.sum(), 1))}
    if num_predicted > num_classes:
        majority = {r: int(np.argmax(matched[r])) for r in range(num_predicted) if matched[r].sum() > 0}
        result["majority"] = _iou_report(matched, class_pixels, majority)
    return result


def _iou_report(matched: np.ndarray, class_pixels: np.ndarray, mapping: dict[int, int]) -> dict:
    num_classes = matched.shape[1]
    true_positive = np.zeros(num_classes)
    predicted_as = np.zeros(num_classes)
    for row, cls in mapping.items():
        true_positive[cls] += matched[row, cls]
        predicted_as[cls] += matched[row].sum()
    union = class_pixels + predicted_as - true_positive
    present = class_pixels > 0
    iou = np.where(union > 0, true_positive / np.maximum(union, 1), 0.0)
    return {"miou": float(iou[present].mean()) if present.any() else 0.0,
            "pixel_accuracy": float(true_positive.sum() / max(class_pixels.sum(), 1)),
            "per_class_iou": {str(c): round(float(iou[c]), 4) for c in range(num_classes) if present[c]}}


def foreground_overlap(mask: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """(intersection, union) of a saliency mask (> 0) with a label's foreground (neither 0 nor IGNORE)."""
    valid = truth != IGNORE
    predicted, actual = (mask > 0) & valid, (truth > 0) & valid
    return int((predicted & actual).sum()), int((predicted | actual).sum())


def foreground_iou(mask_and_label: list[tuple[Path, Path]]) -> dict:
    """IoU of saliency masks (> 0) with the labels' foreground (neither 0 nor 255), dataset-level and per-image mean."""
    intersection = union = 0
    per_image = []
    for mask_path, label_path in mask_and_label:
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        truth = read_label_png(label_path)
        if mask is None or mask.shape != truth.shape:
            raise InputError(f"saliency mask {mask_path} does not match its label {label_path}")
        i, u = foreground_overlap(mask, truth)
        intersection, union = intersection + i, union + u
        per_image.append(i / u if u else 1.0)
    return {"iou": intersection / union if union else 0.0, "mean_image_iou": float(np.mean(per_image)) if per_image else 0.0,
            "images": len(per_image)}


def entry_confusion(entry: Path, items: list[dict], labels: dict[str, Path],
                    num_classes: int = VOC_CLASSES) -> tuple[np.ndarray, int, int]:
    """(256x256 confusion, predicted ids, ground-truth classes) of an entry's masks ({image, mask} items)
    against the labels there are; InputError for a predicted id the entry cannot make, or a label class
    outside 0..num_classes - 1 and 255."""
    confusion = np.zeros((256, 256), dtype=np.int64)
    for item in tqdm(items, desc="confusion", disable=None, leave=False):
        if item["image"] in labels:
            predicted, truth = read_pair(entry / item["mask"], labels[item["image"]])
            stray_class = np.flatnonzero(np.bincount(truth.ravel(), minlength=256)[num_classes:IGNORE])
            if len(stray_class):
                raise InputError(f"{labels[item['image']]}: class {num_classes + int(stray_class[0])} is outside "
                                 f"0..{num_classes - 1} (and 255 ignore); pass --classes N for a dataset of N classes")
            accumulate(confusion, predicted, truth)
    num_predicted = class_count(entry)
    stray = np.flatnonzero(confusion[num_predicted:IGNORE].sum(axis=1))
    if len(stray):
        raise InputError(f"{entry}: predicted id {num_predicted + int(stray[0])} is outside 0..{num_predicted - 1} and 255")
    return confusion, num_predicted, num_classes


SOURCES = {"pseudo_masks": "pseudo_masks", "segmenter": "train"}  # what is evaluated -> the stage that made it


def metrics_file(workdir: Path, source: str, labels_dir: Path) -> Path:
    """One result per (source, label folder): a figure from a partial label set never replaces the full one's."""
    labels_dir = Path(labels_dir).resolve()
    digest = hashlib.sha256(str(labels_dir).encode()).hexdigest()[:8]
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in labels_dir.name)
    return Path(workdir) / "evaluation" / source / f"{name}-{digest}" / "metrics.json"


def evaluate_workdir(workdir: Path, labels_dir: Path, source: str = "pseudo_masks", num_classes: int = VOC_CLASSES) -> dict:
    """Metrics of the last run's pseudo masks or segmenter predictions, and of its saliency masks, against
    labels of `num_classes` classes (background included); written to `metrics_file(...)` when the workdir
    is writable."""
    wd = Workdir(Path(workdir))
    run = wd.last_run(SOURCES[source])
    entry = wd.latest_entry(SOURCES[source], run)
    items = read_items(entry)
    labels = label_files(Path(labels_dir), [i["image"] for i in items])
    names = class_names(Path(labels_dir), num_classes)
    missing = sum(i["image"] not in labels for i in items)
    if missing:
        print(f"warning: {labels_dir} has labels for {len(items) - missing} of the {len(items)} images; the metrics "
              f"cover those only", file=sys.stderr)
    confusion, num_predicted, num_classes = entry_confusion(entry, items, labels, num_classes)
    saliency_items = read_items(wd.latest_entry("saliency", run))
    metrics = {"source": source, "entry": entry.name, "labels": str(Path(labels_dir).resolve()),
               "images_evaluated": len(items) - missing, "images_without_label": missing,
               **scores(confusion, num_predicted, num_classes),
               "saliency_foreground": foreground_iou([(mask_file(wd.store, i["key"]), labels[i["image"]])
                                                      for i in saliency_items if i["image"] in labels])}
    metrics.update(miou=metrics["hungarian"]["miou"], class_names=names,
                   per_class_iou={names[int(c)]: iou for c, iou in metrics["hungarian"]["per_class_iou"].items()})
    try:
        write_json(metrics_file(wd.root, source, labels_dir), metrics)
    except OSError as exc:  # a read-only workdir: the figures are printed all the same
        print(f"warning: metrics not saved in {wd.root} ({exc.strerror})", file=sys.stderr)
    return metrics
