"""ONNX saliency: cost against input size and int8 quantisation, side by side on the same photos.

    python benchmarks/onnx_input_size.py --model ../shared/models/isnet_fp16.onnx \
        --images ../shared/data/voc12-trainaug-330/images --labels ../shared/data/voc12-trainaug-330/labels \
        [--count 60] [--sizes 1024,768,640,512] [--quantize 640,512]

For every setting, the saliency stage's own predictor (float32 on the CPU, the graph scaled to the input
size by `stages.saliency.at_input_size`) runs on the same photos, interleaved photo by photo so that load on
the machine hits every setting alike. Prints seconds per photo, foreground IoU against the labels (dataset
level, as `evaluate` reports it; label 255 ignored) and mask agreement with the first size. `--quantize`
adds ONNX Runtime's dynamic int8 quantisation (`quantize_dynamic`, weights int8) at those sizes.
"""
from __future__ import annotations

import argparse
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
from stages.saliency import Params, _OnnxSaliency, at_input_size, float32_model  # noqa: E402


def quantized(model_path: str, side: int, folder: Path) -> _OnnxSaliency:
    """The stage's predictor with its session replaced by a dynamically int8-quantised copy of its graph."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    predictor = _OnnxSaliency(Params(method="onnx", model=model_path, input_size=side), torch.device("cpu"))
    source, target = folder / f"f32-{side}.onnx", folder / f"int8-{side}.onnx"
    model = onnx.load_from_string(float32_model(model_path))
    native = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    onnx.save(at_input_size(model, native, side, model_path) if side != native else model, source)
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    predictor.session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    return predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--labels", required=True)
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--sizes", default="1024,768,640,512")
    parser.add_argument("--quantize", default="", help="sizes to also run int8-quantised, e.g. 640,512")
    args = parser.parse_args()
    records = list_images(args.images)[:args.count]
    labels = label_files(Path(args.labels), [r.rel for r in records])
    settings = {f"float32 {side}": _OnnxSaliency(Params(method="onnx", model=args.model, input_size=int(side)),
                                                 torch.device("cpu")) for side in args.sizes.split(",")}
    with tempfile.TemporaryDirectory() as folder:
        for side in filter(None, args.quantize.split(",")):
            settings[f"int8 {side}"] = quantized(args.model, int(side), Path(folder))
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
    print(f"{'setting':<14} {'s/photo':>8} {'fg IoU':>7} {'IoU with ' + next(iter(settings)):>24}")
    for name in settings:
        print(f"{name:<14} {seconds[name] / len(records):8.3f} {overlap[name][0] / overlap[name][1]:7.4f} "
              f"{np.mean(agreement[name]):24.4f}")


if __name__ == "__main__":
    main()
