"""Embedding throughput: crops/s of the embed stage's forward pass per backbone, against the device's matmul peak.

    python benchmarks/embed_throughput.py [--batch 64] [--seconds 10] [--models dino_vits8 dino_vits16 mobilenet_v2]
                                          [--device cpu|cuda] [--threads N]

Peak: back-to-back square matmuls (2048 on CPU, 8192 on CUDA) for about --seconds, in float32, and on CUDA
also in float16, the precision AMP runs the models in. Each model is built as the embed stage builds it
(random weights: only the timing matters) and run through the stage's own forward pass
(`stages.embed._forward`: eval, inference_mode, channels-last CNNs, fp16 autocast on CUDA, L2-normalised,
copied back to the host) on random uint8 crops of the stage's default size: one warm-up batch, then
batches for about --seconds. Decoding, cutting and resizing crops (the stage's DataLoader workers) is
not timed. FLOPs come from torch.utils.flop_counter on one crop (they grow linearly with the batch):
matmuls, convolutions and attention, 2 per multiply-add; elementwise work (normalisation, activations,
softmax) is not counted. Prints each model's achieved FLOP/s over the peak (goal >= 0.60).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.backbones import RANDOM, BackboneParams, build_backbone  # noqa: E402
from stages.embed import _forward  # noqa: E402
from stages.objects import Params as ObjectsParams  # noqa: E402

MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}
GOAL = 0.60
# torch's counter knows the CUDA attention kernels but not the CPU one that timm's fused attention runs on CPU
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                       lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calls_per_second(call, seconds: float, device: torch.device) -> float:
    """Rate of `call` over about `seconds` (at least one call), after one warm-up call."""
    call()
    synchronize(device)
    count, elapsed, started = 0, 0.0, time.perf_counter()
    while count == 0 or elapsed < seconds:
        call()
        synchronize(device)
        count += 1
        elapsed = time.perf_counter() - started
    return count / elapsed


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    """Dense-matmul FLOP/s of back-to-back n x n products."""
    n = MATMUL_SIZE[device.type]
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 * calls_per_second(lambda: torch.mm(a, b), seconds, device)


def flops_of(call) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        call()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="crops per forward pass (the embed stage's batch_size)")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per peak and per model")
    parser.add_argument("--models", nargs="+", default=["dino_vits8", "dino_vits16", "mobilenet_v2"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    model_dtype = torch.float16 if device.type == "cuda" else torch.float32  # what the stage's autocast runs
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"torch.get_num_threads() = {torch.get_num_threads()}")
    peaks, size = {}, MATMUL_SIZE[device.type]
    for dtype in dict.fromkeys([torch.float32, model_dtype]):
        peaks[dtype] = matmul_peak(device, dtype, args.seconds)
        print(f"peak dense matmul {str(dtype).removeprefix('torch.')} ({size}x{size}): {peaks[dtype] / 1e9:.1f} GFLOP/s",
              flush=True)
    crop_size = ObjectsParams().crop_size
    crops = torch.randint(0, 256, (args.batch, 3, crop_size, crop_size), dtype=torch.uint8)
    print(f"\n{args.batch} crops of {crop_size}x{crop_size} per batch; ratios against the {str(model_dtype).removeprefix('torch.')} peak")
    print(f"{'model':16s} {'crops/s':>9s} {'GFLOP/crop':>11s} {'GFLOP/s':>9s} {'peak GFLOP/s':>13s} {'achieved/peak':>14s}  goal >= {GOAL:.2f}")
    for name in args.models:
        backbone = build_backbone(BackboneParams(name, RANDOM)).to(device)
        batches_per_second = calls_per_second(lambda: _forward(backbone, crops, device), args.seconds, device)
        flops_per_crop = flops_of(lambda: _forward(backbone, crops[:1], device))
        achieved = flops_per_crop * batches_per_second * args.batch
        ratio = achieved / peaks[model_dtype]
        print(f"{name:16s} {batches_per_second * args.batch:9.1f} {flops_per_crop / 1e9:11.2f} {achieved / 1e9:9.1f} "
              f"{peaks[model_dtype] / 1e9:13.1f} {ratio:14.2f}  {'met' if ratio >= GOAL else 'not met'}", flush=True)


if __name__ == "__main__":
    main()
