"""Channels-last CNN trunks in the embed stage: crops/s of the stage's forward pass with the trunk as built
(channels-last, what `pipeline/backbones.py` does) vs the same trunk in PyTorch's default contiguous layout.

    python benchmarks/channels_last.py [--models mobilenet_v2 resnet50] [--batch 64] [--repeats 3]

Random weights (only the timing matters); uint8 crops of the stage's default size; one warm-up batch per
variant, then --repeats batches alternating between the variants, best of each. Also prints the largest
difference between the two variants' L2-normalised vectors (same weights, same crops).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.backbones import RANDOM, BackboneParams, build_backbone  # noqa: E402
from stages.embed import _forward  # noqa: E402
from stages.objects import Params as ObjectsParams  # noqa: E402


def contiguous_copy(backbone):
    """The same backbone as it ran before channels-last: default layout for the trunk and its input."""
    plain = copy.deepcopy(backbone)
    plain.trunk.to(memory_format=torch.contiguous_format)
    plain._normalize = lambda images: (images.float() - plain.mean) / plain.std
    return plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cpu")
    size = ObjectsParams().crop_size
    crops = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    print(f"{torch.get_num_threads()} threads, batch {args.batch}, {size}x{size} crops")
    print(f"{'model':14s} {'contiguous crops/s':>19s} {'channels-last crops/s':>22s} {'ratio':>6s} {'max |diff|':>11s}")
    for name in args.models:
        torch.manual_seed(0)
        variants = {"channels_last": build_backbone(BackboneParams(name, RANDOM))}
        variants["contiguous"] = contiguous_copy(variants["channels_last"])
        vectors = {key: _forward(backbone, crops, device) for key, backbone in variants.items()}  # warm-up
        best = {key: float("inf") for key in variants}
        for _ in range(args.repeats):
            for key, backbone in variants.items():
                started = time.perf_counter()
                _forward(backbone, crops, device)
                best[key] = min(best[key], time.perf_counter() - started)
        rate = {key: args.batch / seconds for key, seconds in best.items()}
        difference = abs(vectors["channels_last"] - vectors["contiguous"]).max()
        print(f"{name:14s} {rate['contiguous']:19.1f} {rate['channels_last']:22.1f} "
              f"{rate['channels_last'] / rate['contiguous']:6.2f} {difference:11.2e}", flush=True)


if __name__ == "__main__":
    main()
