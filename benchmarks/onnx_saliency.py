"""ONNX saliency on the CPU: a float16 model as shipped vs the same model widened to float32 (what the
saliency stage runs), side by side on the same photos.

    python benchmarks/onnx_saliency.py --model ../shared/models/isnet_fp16.onnx --images ../shared/data/voc12-trainaug-330/images [--count 10]

Prints seconds per image for each, their ratio, and how far the masks differ (foreground IoU of the
two masks, per image, at the stage's threshold 0.5).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.images import list_images, load_rgb  # noqa: E402
from stages.saliency import Params, _OnnxSaliency  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--count", type=int, default=10)
    args = parser.parse_args()
    import onnxruntime

    widened = _OnnxSaliency(Params(method="onnx", model=args.model), torch.device("cpu"))
    shipped = _OnnxSaliency(Params(method="onnx", model=args.model), torch.device("cpu"))
    shipped.session = onnxruntime.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    photos = [load_rgb(r.path) for r in list_images(args.images)[:args.count]]
    seconds = {"float16 as shipped": 0.0, "float32 (the stage)": 0.0}
    ious = []
    for rgb in photos:  # interleaved, so load on the machine hits both alike
        masks = []
        for name, predictor in (("float16 as shipped", shipped), ("float32 (the stage)", widened)):
            started = time.perf_counter()
            masks.append(predictor(None, rgb) > 0)
            seconds[name] += time.perf_counter() - started
        union = (masks[0] | masks[1]).sum()
        ious.append((masks[0] & masks[1]).sum() / union if union else 1.0)
    for name, total in seconds.items():
        print(f"{name:<20} {total / len(photos):6.2f} s/image")
    print(f"speed-up {seconds['float16 as shipped'] / seconds['float32 (the stage)']:.2f}x on {len(photos)} images; "
          f"mask IoU float16 vs float32: mean {np.mean(ious):.4f}, min {np.min(ious):.4f}")


if __name__ == "__main__":
    main()
