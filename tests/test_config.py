"""pipeline.config (through pipeline.runner.Config): defaults <- YAML file <- `section.key=value` overrides, validated into a frozen Config."""
from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.backbones import BackboneParams
from pipeline.runner import Config, load_config, load_config_dict
from pipeline.errors import ConfigError
from stages import cluster, objects, saliency


def write_yaml(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- defaults


def test_defaults_build_and_match_the_dataclass_defaults():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg == Config()
    assert cfg.backbone == BackboneParams()
    assert cfg.cluster == cluster.Params()
    assert cfg.saliency == saliency.Params()
    assert cfg.cluster.k == 20
    assert cfg.workers == 2
    assert cfg.device == "cpu"
    assert cfg.strict is False
    assert isinstance(cfg.saliency.mean, tuple)


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, "")) == Config()


# ---------------------------------------------------------------- file + overrides


def test_yaml_file_values_are_used(tmp_path):
    path = write_yaml(tmp_path, """
cluster:
  k: 7
  core_fraction: 0.5
saliency:
  method: folder
  masks_dir: /some/masks
  mean: [0.1, 0.2, 0.3]
backbone:
  name: dino_vits16
seed: 3
strict: true
""")
    cfg = load_config(path)
    assert cfg.cluster.k == 7
    assert cfg.cluster.core_fraction == 0.5
    assert cfg.cluster.niter == cluster.Params().niter  # untouched keys keep their default
    assert cfg.saliency.method == "folder"
    assert cfg.saliency.masks_dir == "/some/masks"
    assert cfg.saliency.mean == (0.1, 0.2, 0.3)
    assert isinstance(cfg.saliency.mean, tuple)
    assert cfg.backbone.name == "dino_vits16"
    assert cfg.seed == 3
    assert cfg.strict is True


def test_overrides_win_over_the_file(tmp_path):
    path = write_yaml(tmp_path, "cluster:\n  k: 7\n  niter: 11\nseed: 3\nworkers: 4\n")
    cfg = load_config(path, ["cluster.k=30", "seed=9", "backbone.weights=random", "objects.min_area=0.25"])
    assert cfg.cluster.k == 30  # override beats the file
    assert cfg.cluster.niter == 11  # file value kept where not overridden
    assert cfg.seed == 9
    assert cfg.workers == 4
    assert cfg.backbone.weights == "random"
    assert cfg.objects.min_area == 0.25


def test_overrides_without_a_file():
    cfg = load_config(None, ["cluster.k=5", "strict=true", "device=auto", "saliency.std=[0.2, 0.3, 0.4]"])
    assert cfg.cluster.k == 5
    assert cfg.strict is True
    assert cfg.device == "auto"
    assert cfg.saliency.std == (0.2, 0.3, 0.4)


def test_later_override_wins_over_earlier():
    assert load_config(None, ["cluster.k=5", "cluster.k=6"]).cluster.k == 6


def test_int_is_accepted_for_a_float_key():
    cfg = load_config(None, ["objects.margin=1"])
    assert cfg.objects.margin == 1.0
    assert isinstance(cfg.objects.margin, float)


# ---------------------------------------------------------------- unknown keys


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match=r"\bbogus\b"):
        load_config(None, ["bogus=1"])
    with pytest.raises(ConfigError, match=r"\bclusterr\b"):
        load_config(write_yaml(tmp_path, "clusterr:\n  k: 3\n"))


def test_unknown_key_in_a_section_names_the_full_key(tmp_path):
    with pytest.raises(ConfigError, match=r"cluster\.kk\b"):
        load_config(None, ["cluster.kk=30"])
    with pytest.raises(ConfigError, match=r"objects\.minarea\b"):
        load_config(write_yaml(tmp_path, "objects:\n  minarea: 0.1\n"))


# ---------------------------------------------------------------- wrong types


@pytest.mark.parametrize("override, key", [
    ("cluster.k=abc", "cluster.k"),  # int given str
    ("cluster.k=2.5", "cluster.k"),  # int given float
    ("seed=true", "seed"),  # int given bool
    ("strict=1", "strict"),  # bool given int
    ("objects.one_box_per_image=yes please", "objects.one_box_per_image"),  # bool given str
    ("saliency.mean=[0.5, 0.5]", "saliency.mean"),  # tuple of wrong length
    ("saliency.mean=[0.5, 0.5, 0.5, 0.5]", "saliency.mean"),
    ("saliency.std=0.5", "saliency.std"),  # tuple given scalar
    ("saliency.mean=[0.5, abc, 0.5]", "saliency.mean"),  # tuple element of wrong type
    ("saliency.threshold=high", "saliency.threshold"),  # float given str
    ("objects.min_area=true", "objects.min_area"),  # float given bool
    ("device=gpu", "device"),  # not one of the Literal's values
    ("backbone.name=resnet18", "backbone.name"),
    ("saliency.method=magic", "saliency.method"),
    ("backbone.weights=[1, 2]", "backbone.weights"),  # str given list
])
def test_wrong_type_raises_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert key in str(info.value)


def test_wrong_type_in_yaml_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"embed\.batch_size"):
        load_config(write_yaml(tmp_path, "embed:\n  batch_size: many\n"))


def test_section_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="cluster"):
        load_config(write_yaml(tmp_path, "cluster: 5\n"))
    with pytest.raises(ConfigError, match="cluster"):
        load_config(None, ["cluster=5"])


# ---------------------------------------------------------------- invalid values (__post_init__)


@pytest.mark.parametrize("override, key", [
    ("cluster.core_fraction=1.5", "cluster.core_fraction"),
    ("cluster.core_fraction=0", "cluster.core_fraction"),
    ("cluster.k=0", "cluster.k"),
    ("cluster.method=dbscan", "cluster.method"),
    ("cluster.neighbours=1", "cluster.neighbours"),
    ("objects.min_area=-1", "objects.min_area"),
    ("objects.crop_size=8", "objects.crop_size"),
    ("objects.max_objects=255", "objects.max_objects"),
    ("saliency.threshold=1.5", "saliency.threshold"),
    ("saliency.input_size=-1", "saliency.input_size"),
    ("embed.batch_size=0", "embed.batch_size"),
    ("workers=-1", "workers"),
])
def test_invalid_value_raises_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert key in message
    section = key.split(".")[0]
    assert f"{section}.{section}." not in message  # the section prefix is not doubled


def test_invalid_value_from_the_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match=r"cluster\.core_fraction"):
        load_config(write_yaml(tmp_path, "cluster:\n  core_fraction: 1.5\n"))


def test_an_override_can_repair_an_invalid_file_value(tmp_path):
    path = write_yaml(tmp_path, "cluster:\n  core_fraction: 1.5\n")
    assert load_config(path, ["cluster.core_fraction=0.5"]).cluster.core_fraction == 0.5


# ---------------------------------------------------------------- malformed input


@pytest.mark.parametrize("override", ["clusterk30", "=5", "cluster.k"])
def test_malformed_override(override):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, [override])


@pytest.mark.parametrize("text", ["- cluster\n- k\n", "just a string\n", "42\n"])
def test_yaml_file_that_is_not_a_mapping(tmp_path, text):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_invalid_yaml_syntax(tmp_path):
    path = write_yaml(tmp_path, "cluster: {k: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(path)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(missing) in str(info.value)


def test_config_file_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError):
        load_config(tmp_path)


# ---------------------------------------------------------------- round trip, frozen


def test_to_dict_round_trips():
    cfg = load_config(None, ["cluster.k=33", "saliency.mean=[0.1, 0.2, 0.3]", "backbone.name=mobilenet_v2",
                             "strict=true", "objects.min_area=0.01", "seed=5", "device=auto"])
    raw = cfg.to_dict()
    assert isinstance(raw["cluster"], dict)
    assert raw["cluster"]["k"] == 33
    again = load_config_dict(raw)
    assert again == cfg
    assert again.saliency.mean == (0.1, 0.2, 0.3)
    assert isinstance(again.saliency.mean, tuple)


def test_to_dict_round_trips_through_json():
    """The workdir's state is JSON: tuples come back as lists and must be accepted again."""
    cfg = load_config(None, ["saliency.std=[0.2, 0.3, 0.4]", "cluster.core_fraction=0.25"])
    again = load_config_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_load_config_dict_validates():
    raw = Config().to_dict()
    raw["cluster"]["kk"] = 1
    with pytest.raises(ConfigError, match=r"cluster\.kk"):
        load_config_dict(raw)


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cluster.k = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.backbone = BackboneParams("resnet50")


def test_config_is_hashable_and_comparable():
    assert hash(load_config(None, ["cluster.k=4"])) == hash(load_config(None, ["cluster.k=4"]))
    assert load_config(None, ["cluster.k=4"]) != load_config(None, ["cluster.k=5"])


def test_objects_params_direct_construction_is_validated():
    with pytest.raises(ConfigError, match="min_area"):
        objects.Params(min_area=-1.0)


def test_unknown_keys_of_mixed_types_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(write_yaml(tmp_path, "1: 2\nfoo: 3\n"))
