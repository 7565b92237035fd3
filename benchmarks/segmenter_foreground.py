"""Where a segmenter loses against pseudo masks on the same photos: foreground, or classes.

    python3 benchmarks/segmenter_foreground.py --images DIR --labels DIR --pseudo-masks DIR CHECKPOINT...

For the pseudo masks (PNGs named like the photos, e.g. a run's `cache/pseudo_masks/<key>/masks` on a
folder that includes these photos) and for each checkpoint's predictions (its own inference options):
Hungarian mIoU on these photos alone; foreground IoU, precision and recall (anything but background and
ignore against every labelled object); the mIoU when each connected region of a predicted class takes its
majority true class (what the shapes allow, whatever the classes); and the checkpoint's classes painted into
the pseudo masks' foreground (what its classes are worth, whatever its shapes). One JSON line each.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import scipy.ndimage
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from commands.evaluate import VOC_CLASSES, accumulate, scores  # noqa: E402
from pipeline.images import load_rgb, read_label_png, scan_images  # noqa: E402
from pipeline.outputs import IGNORE  # noqa: E402
from pipeline.segmenter import Inference, segmenter_from_checkpoint  # noqa: E402


def regions_with_true_classes(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Each connected region of one predicted class relabelled with its majority true object class."""
    relabelled = np.zeros_like(predicted)
    for value in np.unique(predicted):
        if value in (0, IGNORE):
            continue
        regions, count = scipy.ndimage.label(predicted == value)
        for region in range(1, count + 1):
            inside = regions == region
            classes = truth[inside]
            classes = classes[(classes != 0) & (classes != IGNORE)]
            relabelled[inside] = np.bincount(classes).argmax() if len(classes) else 0
    return relabelled


def report(name: str, pairs: list[tuple[np.ndarray, np.ndarray]], num_predicted: int) -> dict:
    confusion, oracle = np.zeros((2, 256, 256), np.int64)
    both = predicted_pixels = true_pixels = either = 0
    for predicted, truth in pairs:
        accumulate(confusion, predicted, truth)
        accumulate(oracle, regions_with_true_classes(predicted, truth), truth)
        labelled = truth != IGNORE
        object_predicted, object_true = (predicted != 0) & (predicted != IGNORE) & labelled, (truth != 0) & labelled
        both += (object_predicted & object_true).sum()
        either += (object_predicted | object_true).sum()
        predicted_pixels, true_pixels = predicted_pixels + object_predicted.sum(), true_pixels + object_true.sum()
    row = {"name": name, "miou": scores(confusion, num_predicted, VOC_CLASSES)["hungarian"]["miou"],
           "true_class_regions_miou": scores(oracle, VOC_CLASSES, VOC_CLASSES)["hungarian"]["miou"],
           "foreground_iou": both / either, "foreground_precision": both / predicted_pixels,
           "foreground_recall": both / true_pixels}
    return {k: round(float(v), 4) if not isinstance(v, str) else v for k, v in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--pseudo-masks", type=Path, required=True)
    parser.add_argument("checkpoints", type=Path, nargs="+")
    args = parser.parse_args()
    records = scan_images(args.images)[0]
    truth = {r.stem: read_label_png(args.labels / f"{r.stem}.png") for r in records}
    pseudo = {r.stem: read_label_png(args.pseudo_masks / f"{r.stem}.png") for r in records}
    clusters = max(int(np.where(mask == IGNORE, 0, mask).max()) for mask in pseudo.values())
    print(json.dumps(report("pseudo masks", [(pseudo[s], truth[s]) for s in truth], clusters + 1)))
    for checkpoint in args.checkpoints:
        model, payload = segmenter_from_checkpoint(checkpoint, torch.device("cpu"))
        inference = Inference.from_dict(payload["inference"])
        own, painted = [], []
        for record in records:
            rgb = load_rgb(record.path)
            views = model.view_features(rgb, inference)
            probabilities = model.scores(views, rgb.shape[:2])
            objects_class = (probabilities[1:].argmax(0) + 1).numpy().astype(np.uint8)
            foreground = (pseudo[record.stem] != 0) & (pseudo[record.stem] != IGNORE)
            own.append((model.predict(rgb, inference, views)[0], truth[record.stem]))
            painted.append((np.where(foreground, objects_class, 0).astype(np.uint8), truth[record.stem]))
        print(json.dumps(report(f"{checkpoint}", own, payload["num_classes"])))
        print(json.dumps(report(f"{checkpoint}: its classes in the pseudo masks' foreground", painted, payload["num_classes"])))


if __name__ == "__main__":
    main()
