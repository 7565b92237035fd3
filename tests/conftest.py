"""Shared fixtures: synthetic labelled images made by code, a tiny random config, paths to ../shared."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.runner import load_config
from commands.demo import make_shapes

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
VOC = SHARED / "data" / "voc12-trainaug-330"
MOBILENET = SHARED / "models" / "mobilenetv2_imagenet_bottleneck.pt"
ISNET = SHARED / "models" / "isnet_fp16.onnx"

# saliency: the tiny runs cut each photo once; the default (self_trained, which adds a head's training to
# every run) has tests of its own (test_saliency_label_free.py, test_distributed.py)
TINY = ("backbone.name=vit_tiny_random", "workers=0", "cluster.k=3", "cluster.nredo=2", "cluster.niter=20",
        "saliency.method=spectral", "saliency.input_size=112", "train.backbone=vit_tiny_random", "train.epochs=1", "train.crop_size=64",
        "train.base_size=64", "train.batch_size=4", "train.lr=0.001", "train.rounds=1")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Tests never download weights, online or not (tests/test_download.py serves its own on loopback)."""
    monkeypatch.setenv("OBJSEG_OFFLINE", "1")


def tiny_config(*overrides: str):
    """A config on the tiny random ViT: every stage runs in well under a second on synthetic images."""
    return load_config(overrides=[*TINY, *overrides])


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """10 synthetic scenes (images/, labels/), made once per session; copy before changing them."""
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, 10, size=(160, 120))
    return root


@pytest.fixture
def images(shapes_dir, tmp_path) -> Path:
    """A private copy of the synthetic images, free to change."""
    return Path(shutil.copytree(shapes_dir / "images", tmp_path / "images"))


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="session")
def finished_run(shapes_dir, tmp_path_factory) -> tuple[Path, Path, dict]:
    """(workdir, labels folder, stage keys) of one tiny run through train, made once per session:
    read it, do not write into it (copy it first)."""
    from pipeline import runner

    root = tmp_path_factory.mktemp("finished")
    images = shutil.copytree(shapes_dir / "images", root / "images")
    (images / "broken<1>.jpg").write_bytes(b"")  # so the run has a skipped file to report
    keys = runner.run(tiny_config(), images, root / "wd", log=quiet)
    return root / "wd", shapes_dir / "labels", keys
