"""A folder of hostile files, made here by code: the run completes, and every file is either in the
outputs or in the first stage's skipped list with its reason. `--strict` stops at the first bad one."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import runner
from pipeline.artifacts import read_json
from pipeline.errors import InputError
from tests.conftest import tiny_config

PIXEL_LIMIT = 200_000  # a 600x400 image is a "decompression bomb" under this limit


def _photo(size=(96, 72), seed=0) -> Image.Image:
    """A blob on a plain background, so saliency finds an object."""
    rng = np.random.default_rng(seed)
    array = np.full((size[1], size[0], 3), 40, np.uint8)
    h, w = size[1], size[0]
    array[h // 4:3 * h // 4, w // 4:3 * w // 4] = rng.integers(120, 255, 3)
    return Image.fromarray(array)


def make_hostile_folder(root: Path, outside: Path) -> None:
    root.mkdir(parents=True)
    good = _photo()
    good.save(root / "plain.jpg")
    (root / "empty.jpg").write_bytes(b"")
    good.save(root / "whole.jpg")
    (root / "truncated.jpg").write_bytes((root / "whole.jpg").read_bytes()[:300])
    (root / "whole.jpg").unlink()
    good.save(root / "whole.png")
    (root / "truncated.png").write_bytes((root / "whole.png").read_bytes()[:200])
    (root / "whole.png").unlink()
    (root / "random.png").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (root / "notes.txt").write_text("a text file\n")
    (root / "text.jpg").write_text("a text file with an image's name\n")
    good.convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray((np.asarray(good.convert("L"), np.uint16) * 257)).save(root / "sixteen_bit.png")
    good.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    good.convert("1").save(root / "one_bit.png")
    rgba = good.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "rgba.png")
    good.convert("L").save(root / "gray.jpg")
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        _photo(seed=orientation).save(root / f"exif_{orientation}.jpg", exif=exif)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "one_pixel.png")
    _photo((600, 400)).save(root / "bomb.png")  # 240,000 pixels > PIXEL_LIMIT
    _photo(seed=11).save(root / "фото с пробелом.jpg")
    _photo(seed=12).save(root / "日本 語.png")
    (root / "a" / "b" / "c").mkdir(parents=True)
    _photo(seed=13).save(root / "a" / "b" / "c" / "deep.jpg")
    os.symlink(root, root / "a" / "loop")  # a symlink to an ancestor: a loop
    outside.mkdir(parents=True)
    _photo(seed=14).save(outside / "elsewhere.jpg")
    os.symlink(outside / "elsewhere.jpg", root / "outside.jpg")  # followed: datasets are often symlink farms
    os.symlink(outside / "gone.jpg", root / "broken.jpg")
    _photo(seed=15).save(root / "dup.jpg")
    _photo(seed=16).save(root / "dup.png")  # same stem: its masks would overwrite dup.jpg's
    _photo(seed=17).save(root / "UPPER.JPG")
    _photo(seed=18).save(root / "w.webp")
    _photo(seed=19).save(root / "b.bmp")
    _photo(seed=20).save(root / "t.tiff")
    for i in range(4):  # enough ordinary photos for the clustering
        _photo(seed=30 + i).save(root / f"photo_{i}.jpg")


def _every_entry(root: Path) -> set[str]:
    """Every file, symlink and symlinked folder under root, without following links."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            found.add((Path(dirpath) / name).relative_to(root).as_posix())
    return found


@pytest.fixture
def hostile(tmp_path) -> Path:
    make_hostile_folder(tmp_path / "in", tmp_path / "outside")
    return tmp_path / "in"


def test_a_hostile_folder_runs_through_and_nothing_is_lost(hostile, tmp_path):
    keys = runner.run(tiny_config(f"max_pixels={PIXEL_LIMIT}"), hostile, tmp_path / "wd", log=lambda line: None)
    cache = tmp_path / "wd" / "cache"
    outputs = {item["image"] for item in read_json(cache / "pseudo_masks" / keys["pseudo_masks"] / "items.json")}
    skipped = {entry["image"]: entry["reason"] for entry in read_json(tmp_path / "wd" / "state.json")["left_out"]}
    for stage in runner.STAGE_NAMES:
        for entry in read_json(cache / stage / keys[stage] / "manifest.json")["skipped"]:
            skipped[entry["image"]] = entry["reason"]
    assert outputs | set(skipped) == _every_entry(hostile) and not outputs & set(skipped)
    assert set(skipped) == {"empty.jpg", "truncated.jpg", "truncated.png", "random.png", "notes.txt", "text.jpg",
                            "bomb.png", "a/loop", "broken.jpg", "dup.png"}
    assert "0 bytes" in skipped["empty.jpg"] and "pixel limit" in skipped["bomb.png"]
    assert "loop" in skipped["a/loop"] and "dup.jpg" in skipped["dup.png"] and "symlink" in skipped["broken.jpg"]
    assert {"фото с пробелом.jpg", "日本 語.png", "a/b/c/deep.jpg", "outside.jpg", "one_pixel.png", "UPPER.JPG",
            "cmyk.jpg", "sixteen_bit.png", "one_bit.png", "exif_6.jpg"} <= outputs
    trained = cache / "train" / keys["train"] / "masks"
    assert {p.name for p in trained.rglob("*.png")} >= {"фото с пробелом.png", "deep.png"}


@pytest.mark.parametrize("first_bad", ["empty.jpg", "a/loop"])
def test_strict_stops_at_the_first_bad_file(hostile, tmp_path, first_bad):
    for path in sorted(hostile.iterdir()):  # keep the good images and one bad file
        if path.name not in ("plain.jpg", "photo_0.jpg", "photo_1.jpg", "notes.txt", first_bad.split("/")[0]):
            path.unlink() if path.is_file() or path.is_symlink() else shutil.rmtree(path)
    if first_bad == "a/loop":
        shutil.rmtree(hostile / "a" / "b")
    with pytest.raises(InputError, match=rf"{first_bad}: .*strict"):
        runner.run(tiny_config("strict=true"), hostile, tmp_path / "wd", log=lambda line: None)
