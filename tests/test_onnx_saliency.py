"""ONNX saliency at another input size than the model was exported at (ISNet: 1024, run at 640 or 512)."""
from __future__ import annotations

import types

import cv2
import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from stages.saliency import Params, _OnnxSaliency, _onnx_providers, at_input_size

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def traced_like(side: int):
    """A model as tracing exports it at `side`: pool to side/4, upsample to the constants side/2 then side
    (Resize sizes = Concat(Shape(x)[:2], constant)), add the input back (a skip connection), mean, sigmoid."""
    from onnx import TensorProto, helper

    def const(name, values):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))

    nodes = [helper.make_node("AveragePool", ["input"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
             helper.make_node("Shape", ["pooled"], ["shape"]), const("start", [0]), const("end", [2]), const("axis", [0]),
             helper.make_node("Slice", ["shape", "start", "end", "axis"], ["batch_channels"]),
             const("half", [side // 2, side // 2]), const("full", [side, side]),
             helper.make_node("Concat", ["batch_channels", "half"], ["half_size"], axis=0),
             helper.make_node("Concat", ["batch_channels", "full"], ["full_size"], axis=0),
             helper.make_node("Resize", ["pooled", "", "", "half_size"], ["up1"], mode="linear"),
             helper.make_node("Resize", ["up1", "", "", "full_size"], ["up2"], mode="linear"),
             helper.make_node("Sub", ["input", "up2"], ["detail"]),
             helper.make_node("ReduceMean", ["detail"], ["mean"], axes=[1], keepdims=1),
             helper.make_node("Sigmoid", ["mean"], ["output"])]
    graph = helper.make_graph(nodes, "traced", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, side, side])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, side, side])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _run(model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_a_traced_model_runs_at_another_size_as_if_exported_there():
    x = np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)
    with pytest.raises(Exception):  # as exported, its baked sizes clash with a smaller input
        _run(traced_like(64), x)
    adapted = _run(at_input_size(traced_like(64), 64, 32, "traced.onnx"), x)
    assert adapted.shape == (1, 1, 32, 32)
    np.testing.assert_allclose(adapted, _run(traced_like(32), x), rtol=0, atol=1e-6)


def test_a_size_that_does_not_scale_to_whole_pixels_is_refused():
    with pytest.raises(ConfigError, match="input_size=33.*multiple of 2"):
        at_input_size(traced_like(64), 64, 33, "traced.onnx")


def test_the_stage_runs_the_model_at_the_configured_size(tmp_path):
    path = tmp_path / "traced.onnx"
    onnx.save(traced_like(64), path)
    predictor = _OnnxSaliency(Params(method="onnx", model=str(path), input_size=32), torch.device("cpu"))
    rgb = np.zeros((50, 70, 3), np.uint8)
    rgb[10:40, 20:50] = 255  # the square's rim stands out from its blurred surround
    mask = predictor(None, rgb)
    x = cv2.resize(rgb, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32) / 255 - 0.5
    expected = cv2.resize(_run(traced_like(32), x.transpose(2, 0, 1)[None].copy())[0, 0], (70, 50))
    assert predictor.side == 32 and mask.shape == (50, 70) and 0 < (mask > 0).mean() < 1
    np.testing.assert_array_equal(mask > 0, expected > 0.5)


def test_cuda_is_used_only_when_the_device_asks_for_it():
    gpu_build = types.SimpleNamespace(get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert _onnx_providers(gpu_build, torch.device("cpu")) == ["CPUExecutionProvider"]
    # under torchrun each rank's session runs on its own GPU, not on GPU 0
    assert _onnx_providers(gpu_build, torch.device("cuda", 1)) == [("CUDAExecutionProvider", {"device_id": 1}),
                                                                   "CPUExecutionProvider"]


def test_device_cuda_without_the_gpu_build_is_a_one_line_error():
    cpu_build = types.SimpleNamespace(get_available_providers=lambda: ["CPUExecutionProvider"])
    with pytest.raises(ConfigError, match=r"no CUDAExecutionProvider: install the GPU build \(pip install -e"):
        _onnx_providers(cpu_build, torch.device("cuda", 0))


def conv_model(side: int):
    """A small fully convolutional "salient-object model": 3x3 conv to 4 channels, ReLU, 1x1 conv, sigmoid,
    with fixed random weights; enough operators for int8 quantisation to have work to do."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w1"),
               numpy_helper.from_array(rng.normal(0, 0.5, (4,)).astype(np.float32), "b1"),
               numpy_helper.from_array(rng.normal(0, 1.0, (1, 4, 1, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]), helper.make_node("Conv", ["r1", "w2"], ["logit"]),
             helper.make_node("Sigmoid", ["logit"], ["output"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, side, side])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, side, side])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_int8_masks_follow_float32_and_a_photo_added_outside_the_calibration_set_recomputes_nothing(images, tmp_path):
    from pipeline import runner
    from pipeline.artifacts import read_json, stable_hash
    from pipeline.images import fingerprint
    from tests.conftest import quiet, tiny_config

    onnx.save(conv_model(32), tmp_path / "conv.onnx")
    model = ["saliency.method=onnx", f"saliency.model={tmp_path / 'conv.onnx'}", "saliency.calibration=3", "hash_content=true"]

    def stage(workdir, *overrides):
        keys = runner.run(tiny_config(*model, *overrides), images, workdir, log=quiet, start="saliency", only=True)
        entry = workdir / "cache" / "saliency" / keys["saliency"]
        masks = {i["image"]: cv2.imread(str(workdir / "cache" / "saliency" / "items" / f"{i['key']}.png"), 0)
                 for i in read_json(entry / "items.json")}
        return masks, read_json(entry / "manifest.json")

    int8, manifest = stage(tmp_path / "wd")
    float32, _ = stage(tmp_path / "wd32", "saliency.precision=float32")
    quantized = sorted((tmp_path / "wd" / "cache" / "saliency" / "items").glob("int8-*.onnx"))
    assert len(quantized) == 1 and f"items/{quantized[0].name}" in manifest["uses"]
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(quantized[0]).graph.node}
    assert not list((tmp_path / "wd32" / "cache" / "saliency" / "items").glob("int8-*"))
    agree = [((int8[i] > 0) == (float32[i] > 0)).mean() for i in float32]
    assert min(agree) > 0.97 and any(a < 1 for a in agree)  # int8 rounding moves a few pixels, no more

    # a new photo whose fingerprint hashes above the 3 chosen ones leaves the calibration and every mask as they were
    chosen = sorted(stable_hash(fingerprint(p, p.name, True)) for p in images.iterdir())[2]
    photo = next(iter(images.iterdir())).read_bytes()
    for index in range(100):
        added = images / f"added_{index}.jpg"
        added.write_bytes(photo + bytes([index]))  # trailing bytes after the JPEG's end: same pixels, new content
        if stable_hash(fingerprint(added, added.name, True)) > chosen:
            break
        added.unlink()
    grown, manifest = stage(tmp_path / "wd")
    assert manifest["counts"]["computed"] == 1 and len(grown) == len(int8) + 1
    assert sorted((tmp_path / "wd" / "cache" / "saliency" / "items").glob("int8-*.onnx")) == quantized
    assert all((grown[i] == int8[i]).all() for i in int8)


def test_int8_ranges_are_not_set_by_one_outlying_calibration_photo(tmp_path):
    """One calibration input 20x louder than the rest: with ranges at the extreme (min, max), the stage's default
    before, every other input is quantised in steps 20x too coarse (mean |error| 0.059 against 0.011)."""
    from stages.saliency import quantize_int8

    onnx.save(conv_model(32), tmp_path / "conv.onnx")
    float32 = _OnnxSaliency(Params(method="onnx", model=str(tmp_path / "conv.onnx")), torch.device("cpu"))
    rng = np.random.default_rng(1)
    inputs = [rng.normal(0, 1, (1, 3, 32, 32)).astype(np.float32) for _ in range(8)]
    inputs[0] *= 20
    typical = rng.normal(0, 1, (1, 3, 32, 32)).astype(np.float32)
    (expected,) = float32.session.run(None, {float32.input_name: typical})
    error = {}
    for ranges in ("mean", "extreme"):
        quantize_int8(float32, inputs, tmp_path / f"{ranges}.onnx", ranges)
        (found,) = ort.InferenceSession(str(tmp_path / f"{ranges}.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {float32.input_name: typical})
        error[ranges] = np.abs(found - expected).mean()
    assert error["mean"] < 0.03 < error["extreme"]
