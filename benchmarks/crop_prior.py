"""Class shares the segmenter's training crops show vs the whole target images: random crops of rescaled
images over-sample image centres, so objects that sit in the middle of photos are over-represented, and
a network trained on the crops predicts more object on whole images than its targets have.

    python benchmarks/crop_prior.py --targets MASKS --images IMAGES [--crop-size 320] [--base-size 320] [--epochs 2]

MASKS: label PNGs (a pseudo_masks or a training round's masks folder); IMAGES: their photos (same stems).
The crops are `stages.train.PseudoLabelled`'s, seeded as in training (seed 0, round 1, epochs 1..N).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.images import read_label_png  # noqa: E402
from pipeline.outputs import IGNORE  # noqa: E402
from stages.train import Params, PseudoLabelled  # noqa: E402


def background_share(labels: torch.Tensor) -> tuple[int, int]:
    """(background pixels, labelled pixels) of one label map."""
    labelled = labels[labels != IGNORE]
    return int((labelled == 0).sum()), labelled.numel()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--crop-size", type=int, default=320)
    parser.add_argument("--base-size", type=int, default=320)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    targets = sorted(args.targets.glob("*.png"))
    photos = {p.stem: p for p in args.images.iterdir()}
    images = [photos[t.stem] for t in targets]
    whole = [background_share(torch.from_numpy(read_label_png(t))) for t in targets]
    dataset = PseudoLabelled(images, targets, Params(crop_size=args.crop_size, base_size=args.base_size), seed=0, round_index=1)
    crops = []
    for epoch in range(1, args.epochs + 1):
        dataset.epoch = epoch
        crops += [background_share(dataset[i][1]) for i in range(len(dataset))]
    for name, counts in (("whole images", whole), (f"training crops, epochs 1-{args.epochs}", crops)):
        background, labelled = map(sum, zip(*counts))
        print(f"{name}: background {background / labelled:.1%} of {labelled:,} labelled pixels")


if __name__ == "__main__":
    main()
