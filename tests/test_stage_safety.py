"""Stages tell the truth about their inputs: a photo with nothing in it has no object, a photo that fails to
decode in embed is not cached as empty, cluster ids fit the 8-bit masks, and model weights enter the cache
keys by content, not by path."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import runner
from pipeline.artifacts import read_json
from pipeline.errors import ConfigError, InputError
from tests.conftest import quiet, tiny_config


def _entry(workdir, stage, keys):
    return workdir / "cache" / stage / keys[stage]


def test_a_black_or_grey_photo_among_scenes_has_no_object_and_an_all_background_mask(images, tmp_path):
    cv2.imwrite(str(images / "black.jpg"), np.zeros((120, 160, 3), np.uint8))
    noise = np.random.default_rng(0).integers(-3, 4, (120, 160, 1))  # a grey wall: a few levels of sensor noise
    cv2.imwrite(str(images / "grey.png"), (128 + noise).repeat(3, axis=2).astype(np.uint8))
    keys = runner.run(tiny_config(), images, tmp_path / "wd", start="pseudo_masks", only=True, log=quiet)
    found = {item["image"]: item["objects"] for item in read_json(_entry(tmp_path / "wd", "objects", keys) / "items.json")}
    assert found["black.jpg"] == found["grey.png"] == 0
    assert sum(found.values()) > 0  # the scenes still have theirs
    masks = _entry(tmp_path / "wd", "pseudo_masks", keys)
    blank = [item["mask"] for item in read_json(masks / "items.json") if item["image"] in ("black.jpg", "grey.png")]
    assert len(blank) == 2 and not any(np.asarray(Image.open(masks / mask)).any() for mask in blank)


def _keeping_size_and_mtime(path, data: bytes) -> None:
    """Write `data` over `path` so that its fingerprint (size, mtime) stays: the cached saliency and objects
    of the photo still apply, as when a read fails only once (a network share, a photo being synced)."""
    stat = path.stat()
    assert len(data) == stat.st_size
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_photo_that_fails_to_decode_in_embed_is_embedded_once_it_reads_again(images, tmp_path):
    """A failure is not a result: the embed entry is not made without the photo, and the same command,
    run again once the photo reads, embeds it (finished shards are reused)."""
    workdir = tmp_path / "wd"
    keys = runner.run(tiny_config(), images, workdir, start="objects", only=True, log=quiet)
    counts = {item["image"]: item["objects"] for item in read_json(_entry(workdir, "objects", keys) / "items.json")}
    victim = images / next(name for name, n in sorted(counts.items()) if n > 0)
    photo = victim.read_bytes()
    _keeping_size_and_mtime(victim, bytes(len(photo)))
    with pytest.raises(InputError, match=f"{victim.name}: .*saliency stage read it"):
        runner.run(tiny_config("embed.shard_images=1"), images, workdir, start="embed", only=True, log=quiet)
    assert not (workdir / "cache" / "embed" / keys["embed"] / "manifest.json").exists()
    shards_before = sorted((workdir / "cache" / "embed" / "items").glob("*.json"))

    _keeping_size_and_mtime(victim, photo)
    keys = runner.run(tiny_config("embed.shard_images=1"), images, workdir, start="embed", only=True, log=quiet)
    embed = _entry(workdir, "embed", keys)
    position = [item["image"] for item in read_json(embed / "items.json")].index(victim.name)
    with np.load(embed / "objects.npz") as rows:
        assert (rows["image_index"] == position).sum() == counts[victim.name]
    assert set(shards_before) <= set((workdir / "cache" / "embed" / "items").glob("*.json"))  # kept, not redone


def test_cluster_ids_must_fit_between_background_0_and_ignore_255():
    assert tiny_config("cluster.k=254").cluster.k == 254
    with pytest.raises(ConfigError, match=r"cluster.k must be in \[1, 254\].*got 255"):
        tiny_config("cluster.k=255")


def test_model_weights_are_keyed_by_content_not_by_path(images, tmp_path):
    def keys_with(weights):
        cfg = tiny_config("backbone.name=mobilenet_v2", f"backbone.weights={weights}",
                          "train.backbone=mobilenet_v2", f"train.weights={weights}")
        return runner.stage_keys(cfg, runner.scan_images(images)[0])

    first = tmp_path / "a" / "weights.pth"
    first.parent.mkdir()
    torch.save({"features.0.weight": torch.zeros(4, 3)}, first)
    keys = keys_with(first)
    moved = tmp_path / "b" / "renamed.pth"
    moved.parent.mkdir()
    first.rename(moved)
    assert keys_with(moved) == keys

    torch.save({"features.0.weight": torch.ones(4, 3)}, tmp_path / "download.pth")
    os.replace(tmp_path / "download.pth", moved)  # other weights at the same path
    replaced = keys_with(moved)
    assert [stage for stage in ("saliency", "embed", "train") if replaced[stage] == keys[stage]] == []
