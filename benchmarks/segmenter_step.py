"""Segmenter training step on the CPU: ASPP on MobileNetV2's 320-channel last block (what train uses)
vs on the 1280-channel 1x1 conv after it (torchvision's classifier input), side by side.

    python benchmarks/segmenter_step.py [--crop 320] [--batch 8] [--steps 4]

Both models: the same dilated (output stride 16) random trunk, DeepLabHead, Adam, CrossEntropy, one
random batch; prints seconds per step (forward + backward + update, after one warm-up step) and the ratio.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.backbones import BackboneParams, build_trunk  # noqa: E402
from pipeline.segmenter import Segmenter  # noqa: E402


class Head1280(nn.Module):
    """The earlier layout: the trunk with its last 1x1 conv to 1280 channels, ASPP on that."""

    def __init__(self, classes: int):
        super().__init__()
        self.trunk, _ = build_trunk(BackboneParams("mobilenet_v2", "random"), dilated=True)
        self.head = DeepLabHead(1280, classes)

    def forward(self, x):
        return F.interpolate(self.head(self.trunk.features(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)


def seconds_per_step(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, steps: int) -> float:
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    model.train()
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        loss = F.cross_entropy(model(images), masks, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return sum(times[1:]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crop", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.crop, args.crop)
    masks = torch.randint(0, 21, (args.batch, args.crop, args.crop))
    before = seconds_per_step(Head1280(21), images, masks, args.steps)
    after = seconds_per_step(Segmenter(BackboneParams("mobilenet_v2", "random"), 21), images, masks, args.steps)
    print(f"ASPP on 1280 channels {before:.2f} s/step, on 320 channels {after:.2f} s/step: "
          f"{before / after:.2f}x faster (batch {args.batch}, crop {args.crop}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
