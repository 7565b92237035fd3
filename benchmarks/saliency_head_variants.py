"""What the self-trained saliency head learns from, and what it reads: foreground IoU of each variant.

    python3 benchmarks/saliency_head_variants.py --images DIR --labels DIR --weights mobilenet.pt [--count N]
        [--rounds 6] [--seeds 0 1 2]

Each photo's patch features are computed once at both levels (Backbone.patch_features), the two
spectral cuts once (level 1: the spectral grid's map; level 2: it joined by the next stage's), then
heads are trained exactly as stages/saliency.py trains them (same targets, Adam, batch, steps, seed,
float16 patches) on every photo, and their refined predictions scored; then the default head for each
seed and round (round r learns round r - 1's refined masks, as `saliency.head.rounds` does). Foreground
IoU is summed over the photos (as `evaluate` reports it) and over each half of them (even / odd
position), so a variant that helps one half only shows it.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from commands.evaluate import foreground_overlap  # noqa: E402
from pipeline.backbones import BackboneParams, build_backbone  # noqa: E402
from pipeline.images import load_rgb, read_label_png, scan_images  # noqa: E402
from stages.saliency import (SPECTRAL_GRID, HeadParams, Params, _train_head, fiedler_foreground,  # noqa: E402
                             patch_shares, refined_mask)

REFINE = Params().refine


def foreground_iou(masks: list[np.ndarray], truths: list[np.ndarray]) -> float:
    inter, union = np.sum([foreground_overlap(mask, truth) for mask, truth in zip(masks, truths)], axis=0)
    return inter / max(union, 1)


def shares(masks: list[np.ndarray]) -> torch.Tensor:
    """Each mask's foreground share per patch, flattened and joined (the head's targets)."""
    return torch.cat([torch.from_numpy(patch_shares(m, (SPECTRAL_GRID, SPECTRAL_GRID)).reshape(-1)) for m in masks])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True)
    parser.add_argument("--labels", required=True)
    parser.add_argument("--weights", required=True, help="MobileNetV2 weights")
    parser.add_argument("--count", type=int, default=0, help="first N photos only (0: all)")
    parser.add_argument("--rounds", type=int, default=6, help="self-training rounds of the default head, per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(2)
    backbone = build_backbone(BackboneParams("mobilenet_v2", args.weights))
    side = SPECTRAL_GRID * backbone.patch_stride
    records = scan_images(args.images)[0]
    records = records[:args.count] if args.count else records
    with torch.inference_mode():
        fine_channels = backbone.patch_features(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape[1]
    photos, truths, features, cuts = [], [], {1: [], 2: []}, {1: [], 2: []}
    for record in records:
        rgb = load_rgb(record.path)
        resized = cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA)
        with torch.inference_mode():
            both = backbone.patch_features(torch.from_numpy(resized).permute(2, 0, 1)[None], levels=2)[0].float()
        for level, level_features in ((1, both[:fine_channels]), (2, both)):  # level 1 comes first in level 2
            patches = level_features.flatten(1).T
            features[level].append(patches.to(torch.float16))
            score = fiedler_foreground(patches.numpy().astype(np.float64), (SPECTRAL_GRID, SPECTRAL_GRID), Params().tau)
            cuts[level].append(refined_mask(rgb, score > 0, REFINE))
        photos.append(rgb)
        truths.append(read_label_png(Path(args.labels) / f"{Path(record.rel).stem}.png"))
    halves = (slice(0, None, 2), slice(1, None, 2))

    def report(name: str, masks: list[np.ndarray]) -> list[np.ndarray]:
        scores = [foreground_iou(masks, truths)] + [foreground_iou(masks[h], truths[h]) for h in halves]
        print(f"{name:<52} {scores[0]:.3f}   halves {scores[1]:.3f} / {scores[2]:.3f}", flush=True)
        return masks

    def head(level: int, targets: torch.Tensor, seed: int = 0) -> list[np.ndarray]:
        with tempfile.TemporaryDirectory() as tmp:
            trained = _train_head(torch.cat(features[level]), targets, HeadParams(), seed, Path(tmp) / "head.resume")
        grid = (SPECTRAL_GRID, SPECTRAL_GRID)
        return [refined_mask(rgb, trained.probability(f, grid), REFINE) for rgb, f in zip(photos, features[level])]

    print(f"{len(photos)} photos; foreground IoU over all, then over each half")
    report("spectral cut, level 1 (method=spectral)", cuts[1])
    report("spectral cut, level 2", cuts[2])
    one, two = shares(cuts[1]), shares(cuts[2])
    mean = (one + two) / 2
    report("head on level 1, learns cut 1 (self_trained before)", head(1, one))
    report("head on level 2, learns cut 1", head(2, one))
    report("head on level 2, learns cut 2", head(2, two))
    report("head on level 1, learns mean of cuts 1, 2", head(1, mean))
    report("head on level 2, learns mean of cuts 1, 2 (round 1)", head(2, mean))
    for seed in args.seeds:  # round r learns round r - 1's refined masks (saliency.head.rounds)
        masks = None
        for round_ in range(1, args.rounds + 1):
            masks = report(f"seed {seed}, round {round_}", head(2, mean if masks is None else shares(masks), seed))


if __name__ == "__main__":
    main()
