"""ONNX saliency: cost against input size and int8 quantisation, side by side on the same photos.

    python benchmarks/onnx_input_size.py --model ../shared/models/isnet_fp16.onnx \
        --images ../shared/data/voc12-trainaug-330/images --labels ../shared/data/voc12-trainaug-330/labels \
        [--count 60] [--sizes 1024,768,640,512] [--int8 1024,640] [--ranges mean,extreme] [--draws 3]

For every setting, the saliency stage's own predictor (float32 on the CPU, the graph scaled to the input
size by `stages.saliency.at_input_size`) runs on the same photos, interleaved photo by photo so that load on
the machine hits every setting alike. Prints seconds per photo, foreground IoU against the labels (dataset
level, as `evaluate` reports it; label 255 ignored) and mask agreement with the first size. `--int8` adds the
stage's static int8 quantisation (`saliency.precision=int8`) at those sizes, calibrated as the stage does on
`--calibration` photos of the whole folder (those whose fingerprints hash lowest), and with `--draws` on
random sets of as many photos, to show how much the masks depend on which photos calibrate.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.images import list_images, load_rgb, read_label_png  # noqa: E402
from commands.evaluate import label_files  # noqa: E402
from pipeline.outputs import IGNORE  # noqa: E402
from stages.saliency import Params, _OnnxSaliency, calibration_photos, quantize_int8  # noqa: E402


def quantized(model_path: str, side: int, photos: list, path: Path, ranges: str) -> _OnnxSaliency:
    """The stage's int8 predictor: its float32 graph quantised with ranges from `photos`."""
    params = Params(method="onnx", model=model_path, input_size=side)
    float32 = _OnnxSaliency(params, torch.device("cpu"))
    quantize_int8(float32, [float32.input(load_rgb(r.path)) for r in photos], path, ranges)
    return _OnnxSaliency(params, torch.device("cpu"), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--labels", required=True)
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--sizes", default="1024,768,640,512")
    parser.add_argument("--int8", default="", help="sizes to also run int8-quantised, e.g. 1024,640")
    parser.add_argument("--calibration", type=int, default=Params.calibration)
    parser.add_argument("--ranges", default="mean", help="int8 activation ranges over the calibration photos: "
                        "mean (the stage's) and/or extreme (ONNX Runtime's default), e.g. mean,extreme")
    parser.add_argument("--draws", type=int, default=0, help="also calibrate on this many random sets of "
                        "--calibration photos (seeds 1..N), besides the stage's own set")
    args = parser.parse_args()
    folder = list_images(args.images, hash_content=True)  # the calibration photos of `--hash-content` runs
    records = folder[:args.count]
    labels = label_files(Path(args.labels), [r.rel for r in records])
    settings = {f"float32 {side}": _OnnxSaliency(Params(method="onnx", model=args.model, input_size=int(side)),
                                                 torch.device("cpu")) for side in args.sizes.split(",")}
    with tempfile.TemporaryDirectory() as scratch:
        sets = {"": calibration_photos(folder, args.calibration)}
        sets.update({f" draw {seed}": random.Random(seed).sample(folder, args.calibration)
                     for seed in range(1, args.draws + 1)})
        for side in filter(None, args.int8.split(",")):
            for ranges in args.ranges.split(","):
                for draw, photos in sets.items():
                    name = f"int8 {side} {ranges}{draw}"
                    settings[name] = quantized(args.model, int(side), photos, Path(scratch) / f"{name}.onnx", ranges)
        seconds = dict.fromkeys(settings, 0.0)
        overlap = {name: [0, 0] for name in settings}  # intersection, union with the labels' foreground
        agreement = {name: [] for name in settings}
        for record in records:
            rgb, truth = load_rgb(record.path), read_label_png(labels[record.rel])
            valid, actual = truth != IGNORE, (truth > 0) & (truth != IGNORE)
            first = None
            for name, predictor in settings.items():
                started = time.perf_counter()
                mask = predictor(record, rgb) > 0
                seconds[name] += time.perf_counter() - started
                overlap[name][0] += int((mask & actual & valid).sum())
                overlap[name][1] += int(((mask | actual) & valid).sum())
                first = mask if first is None else first
                union = (mask | first).sum()
                agreement[name].append((mask & first).sum() / union if union else 1.0)
    print(f"{len(records)} photos, {torch.get_num_threads()} threads")
    print(f"{'setting':<27} {'s/photo':>8} {'fg IoU':>7} {'IoU with ' + next(iter(settings)):>24}")
    for name in settings:
        print(f"{name:<27} {seconds[name] / len(records):8.3f} {overlap[name][0] / overlap[name][1]:7.4f} "
              f"{np.mean(agreement[name]):24.4f}")


if __name__ == "__main__":
    main()
