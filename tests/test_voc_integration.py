"""Real photos and real weights from ../shared: a handful of VOC images through the whole pipeline."""
from __future__ import annotations

import os

import pytest

from pipeline import runner
from pipeline.runner import load_config
from commands.evaluate import evaluate_workdir
from tests.conftest import ISNET, MOBILENET, VOC, quiet

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (VOC.is_dir() and MOBILENET.is_file() and ISNET.is_file()),
                                 reason="../shared (VOC photos and stand-in weights) is not present")]

STANDIN = ("backbone.name=mobilenet_v2", f"backbone.weights={MOBILENET}", "cluster.k=3", "cluster.nredo=2", "workers=1")


@pytest.fixture(scope="module")
def voc_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("voc")
    for image_id in (VOC / "ids.txt").read_text().split()[:6]:
        os.symlink(VOC / "images" / f"{image_id}.jpg", folder / f"{image_id}.jpg")
    return folder


def test_isnet_saliency_and_mobilenet_embeddings_on_voc_photos(voc_images, tmp_path):
    found = {}
    for precision in ("int8", "float32"):  # int8 (the CPU default) calibrated on these photos
        cfg = load_config(overrides=[*STANDIN, "saliency.method=onnx", f"saliency.model={ISNET}",
                                     f"saliency.precision={precision}"])
        runner.run(cfg, voc_images, tmp_path / precision, start="pseudo_masks", only=True, log=quiet)
        metrics = evaluate_workdir(tmp_path / precision, VOC / "labels")
        assert metrics["images_evaluated"] == 6 and 0.0 < metrics["miou"] <= 1.0
        found[precision] = metrics["saliency_foreground"]["iou"]
    assert found["float32"] > 0.6  # ISNet finds VOC's objects (0.79 on 8 photos, models README)
    assert abs(found["int8"] - found["float32"]) < 0.02  # VOC-330: 0.6365 against 0.6369 (README)


def test_spectral_saliency_on_voc_photos(voc_images, tmp_path):
    cfg = load_config(overrides=[*STANDIN, "saliency.method=spectral"])
    runner.run(cfg, voc_images, tmp_path / "wd", start="pseudo_masks", only=True, log=quiet)
    metrics = evaluate_workdir(tmp_path / "wd", VOC / "labels")
    assert metrics["images_evaluated"] == 6 and metrics["saliency_foreground"]["iou"] > 0.1
