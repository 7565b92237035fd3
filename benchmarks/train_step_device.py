"""Segmenter training step, CPU vs GPU side by side: the MobileNetV2 DeepLabv3 that `train` uses, stepped by
`train`'s own `train_step` (float16 autocast and a GradScaler on CUDA, float32 on the CPU).

    python benchmarks/train_step_device.py [--crop 320] [--batch 8] [--steps 10] [--cpu-threads 2]

One random batch, random trunk weights (the speed does not depend on them); prints seconds per step
(forward + backward + update, after two warm-up steps) per device and the ratio. The CPU runs on
`--cpu-threads` threads, 2 by default as on the project's VM.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.backbones import BackboneParams  # noqa: E402
from pipeline.segmenter import Segmenter  # noqa: E402
from pipeline.outputs import IGNORE  # noqa: E402
from stages.train import train_step  # noqa: E402


def seconds_per_step(device: torch.device, images: torch.Tensor, masks: torch.Tensor, steps: int) -> float:
    torch.manual_seed(0)
    model = Segmenter(BackboneParams("mobilenet_v2", "random"), 21).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    criterion = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)
    images, masks = images.to(device), masks.to(device)
    warmup = 2
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        train_step(model, criterion, optimizer, scaler, images, masks)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crop", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cpu-threads", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark compares the CPU with a GPU")
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.crop, args.crop)
    masks = torch.randint(0, 21, (args.batch, args.crop, args.crop))
    torch.set_num_threads(args.cpu_threads)
    cpu = seconds_per_step(torch.device("cpu"), images, masks, max(1, args.steps // 5))
    gpu = seconds_per_step(torch.device("cuda"), images, masks, args.steps)
    print(f"train step, batch {args.batch}, crop {args.crop}: CPU ({args.cpu_threads} threads) {cpu:.3f} s, "
          f"{torch.cuda.get_device_name()} (float16 autocast) {gpu:.4f} s: {cpu / gpu:.0f}x faster")


if __name__ == "__main__":
    main()
