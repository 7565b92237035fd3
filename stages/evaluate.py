"""Evaluate: Hungarian-matched mIoU of predicted ids against ground-truth classes, over the whole dataset.

Predicted ids (background included) are matched one-to-one to ground-truth classes by maximising
the matched pixels of the dataset-level confusion (scipy's `linear_sum_assignment`), as the
unsupervised segmentation literature does. Ground-truth 255 is ignored. Pixels a prediction leaves
as ignore (255) count as wrong in `miou` (they are labelled nothing); `miou_labelled_only` leaves
them out. With more predicted ids than classes, majority voting (each id to its most frequent class)
is reported as well. Foreground IoU of the saliency masks is reported too.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from pipeline.artifacts import read_json
from pipeline.errors import InputError
from pipeline.images import IMAGE_SUFFIXES, read_label_png, stem_of

IGNORE = 255


def label_files(labels_dir: Path, images: list[str]) -> dict[str, Path]:
    """Each image's ground-truth file: same relative stem, or same file stem, `.png` first."""
    if not labels_dir.is_dir():
        raise InputError(f"labels folder not found: {labels_dir}")
    by_stem: dict[str, Path] = {}
    for path in sorted(labels_dir.rglob("*"), key=lambda p: (p.suffix.lower() != ".png", str(p))):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            by_stem.setdefault(path.relative_to(labels_dir).with_suffix("").as_posix(), path)
            by_stem.setdefault(path.stem, path)
    found = {}
    for rel in images:
        path = by_stem.get(stem_of(rel)) or by_stem.get(Path(rel).stem)
        if path is not None:
            found[rel] = path
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


def foreground_iou(mask_and_label: list[tuple[Path, Path]]) -> dict:
    """IoU of saliency masks (> 0) with the labels' foreground (neither 0 nor 255), dataset-level and per-image mean."""
    intersection = union = 0
    per_image = []
    for mask_path, label_path in mask_and_label:
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        truth = read_label_png(label_path)
        if mask is None or mask.shape != truth.shape:
            raise InputError(f"saliency mask {mask_path} does not match its label {label_path}")
        valid = truth != IGNORE
        predicted, actual = (mask > 0) & valid, (truth > 0) & valid
        i, u = int((predicted & actual).sum()), int((predicted | actual).sum())
        intersection, union = intersection + i, union + u
        per_image.append(i / u if u else 1.0)
    return {"iou": intersection / union if union else 0.0, "mean_image_iou": float(np.mean(per_image)) if per_image else 0.0,
            "images": len(per_image)}


def entry_confusion(entry: Path, items: list[dict], labels: dict[str, Path]) -> tuple[np.ndarray, int, int]:
    """(256x256 confusion, predicted ids, ground-truth classes) of an entry's masks ({image, mask} items)
    against the labels there are; InputError for a predicted id the entry cannot make."""
    confusion = np.zeros((256, 256), dtype=np.int64)
    for item in tqdm(items, desc="confusion", disable=None, leave=False):
        if item["image"] in labels:
            accumulate(confusion, *read_pair(entry / item["mask"], labels[item["image"]]))
    present = np.flatnonzero(confusion.sum(axis=0))
    num_classes = int(present.max()) + 1 if len(present) else 1
    num_predicted = read_json(entry / "manifest.json")["counts"]["classes"]
    stray = np.flatnonzero(confusion[num_predicted:IGNORE].sum(axis=1))
    if len(stray):
        raise InputError(f"{entry}: predicted id {num_predicted + int(stray[0])} is outside 0..{num_predicted - 1} and 255")
    return confusion, num_predicted, num_classes


SOURCES = {"pseudo_masks": "pseudo_masks", "segmenter": "train"}  # what is evaluated -> the stage that made it


def evaluate_workdir(workdir: Path, labels_dir: Path, source: str = "pseudo_masks") -> dict:
    """Metrics of the last run's pseudo masks or segmenter predictions, and of its saliency masks;
    written to `<workdir>/evaluation/<source>/metrics.json`."""
    from pipeline.artifacts import write_json
    from pipeline.context import ITEMS
    from pipeline.runner import Workdir
    from stages.saliency import mask_file

    wd = Workdir(Path(workdir))
    entry = wd.latest_entry(SOURCES[source])
    items = read_json(entry / ITEMS)
    labels = label_files(Path(labels_dir), [i["image"] for i in items])
    confusion, num_predicted, num_classes = entry_confusion(entry, items, labels)
    saliency_items = read_json(wd.latest_entry("saliency") / ITEMS)
    metrics = {"source": source, "entry": entry.name, "images_evaluated": sum(i["image"] in labels for i in items),
               "images_without_label": sum(i["image"] not in labels for i in items),
               **scores(confusion, num_predicted, num_classes),
               "saliency_foreground": foreground_iou([(mask_file(wd.store, i["key"]), labels[i["image"]])
                                                      for i in saliency_items if i["image"] in labels])}
    metrics["miou"] = metrics["hungarian"]["miou"]
    write_json(wd.root / "evaluation" / source / "metrics.json", metrics)
    return metrics
