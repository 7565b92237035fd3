"""Files from elsewhere are data, never code: pickles that would run a command, YAML with Python tags,
an ONNX model that was not named explicitly."""
from __future__ import annotations

import os

import pytest
import torch

from pipeline.backbones import BackboneParams, build_backbone
from pipeline.runner import load_config
from pipeline.errors import ConfigError, InputError, WeightsMismatchError
from pipeline.names import load_names
from pipeline.segmenter import load_checkpoint
from commands.predict import predict_folder
from tests.conftest import tiny_config


class RunsACommand:
    """Unpickling this calls os.system: what a booby-trapped checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def trap(tmp_path):
    marker = tmp_path / "the_command_ran"
    path = tmp_path / "trap.pt"
    torch.save({"format": "objseg.segmenter/2", "model": RunsACommand(marker)}, path)
    return path, marker


def test_a_booby_trapped_weights_file_is_refused_and_its_code_never_runs(trap):
    path, marker = trap
    with pytest.raises(WeightsMismatchError, match="not a loadable weights file"):
        build_backbone(BackboneParams("mobilenet_v2", weights=str(path)))
    assert not marker.exists()


def test_a_booby_trapped_checkpoint_is_refused_by_load_and_predict(trap, tmp_path):
    path, marker = trap
    with pytest.raises(InputError, match="not a readable checkpoint"):
        load_checkpoint(path)
    (tmp_path / "images").mkdir()
    with pytest.raises(InputError, match="not a readable checkpoint"):
        predict_folder(path, tmp_path / "images", tmp_path / "out", torch.device("cpu"))
    assert not marker.exists()


def test_yaml_with_python_tags_is_refused(tmp_path):
    marker = tmp_path / "the_command_ran"
    tagged = f"cluster: !!python/object/apply:os.system ['touch {marker}']\n"
    (tmp_path / "config.yaml").write_text(tagged)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "config.yaml")
    (tmp_path / "names.yaml").write_text(f"0: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(InputError):
        load_names(tmp_path / "names.yaml", k=3)
    assert not marker.exists()


def test_an_onnx_model_is_only_taken_from_an_explicit_path(images, tmp_path):
    from pipeline import runner

    with pytest.raises(ConfigError, match="needs saliency.model="):
        runner.run(tiny_config("saliency.method=onnx"), images, tmp_path / "wd")
    with pytest.raises(InputError, match="no such file"):
        runner.run(tiny_config("saliency.method=onnx", f"saliency.model={tmp_path / 'nowhere.onnx'}"), images, tmp_path / "wd")
