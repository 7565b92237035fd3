"""The cache: hits, partial invalidation, incremental folders, interrupted writes, determinism, bad input."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import stages.cluster
from pipeline import runner
from pipeline.artifacts import read_json
from pipeline.errors import InputError
from tests.conftest import ROOT, TINY, tiny_config


def _run(images, workdir, *overrides, **kwargs):
    lines = []
    keys = runner.run(tiny_config(*overrides), images, workdir, log=lines.append, **kwargs)
    return keys, {line.split()[0]: line.split()[1] for line in lines}


def _manifest(workdir, stage, keys):
    return read_json(Path(workdir) / "cache" / stage / keys[stage] / "manifest.json")


def test_second_run_takes_everything_from_the_cache(images, tmp_path):
    first, done = _run(images, tmp_path / "wd")
    assert set(done.values()) == {"computed"}
    second, done = _run(images, tmp_path / "wd")
    assert second == first and set(done.values()) == {"cached"}
    assert {row["status"] for row in runner.status(tmp_path / "wd")} == {"cached"}


def test_changing_k_recomputes_only_cluster_and_pseudo_masks(images, tmp_path):
    before, _ = _run(images, tmp_path / "wd")
    after, done = _run(images, tmp_path / "wd", "cluster.k=4", start="cluster")
    assert done == {"saliency": "cached", "objects": "cached", "embed": "cached",
                    "cluster": "computed", "pseudo_masks": "computed", "train": "computed"}
    assert [after[s] == before[s] for s in runner.STAGE_NAMES] == [True, True, True, False, False, False]


def test_changing_objects_params_keeps_saliency(images, tmp_path):
    _run(images, tmp_path / "wd")
    _, done = _run(images, tmp_path / "wd", "objects.margin=0.2")
    assert done["saliency"] == "cached" and done["objects"] == done["embed"] == "computed"


def test_status_reports_stale_after_the_folder_changes(images, tmp_path):
    _run(images, tmp_path / "wd")
    shutil.copy(images / "shape_0000.jpg", images / "new.jpg")
    assert {row["status"] for row in runner.status(tmp_path / "wd")} == {"stale"}


def test_an_added_image_is_the_only_one_the_per_image_stages_compute(images, tmp_path):
    _run(images, tmp_path / "wd")
    shutil.copy(images / "shape_0003.jpg", images / "zz_new.jpg")
    keys, done = _run(images, tmp_path / "wd")
    assert set(done.values()) == {"computed"}  # the dataset changed, so every stage-level entry is new ...
    assert _manifest(tmp_path / "wd", "saliency", keys)["counts"]["computed"] == 1  # ... but per image only one
    assert _manifest(tmp_path / "wd", "objects", keys)["counts"]["computed"] == 1
    assert _manifest(tmp_path / "wd", "embed", keys)["counts"]["computed_images"] == 1


def test_a_failing_stage_leaves_no_finished_entry_and_keeps_earlier_results(images, tmp_path, monkeypatch):
    good, _ = _run(images, tmp_path / "wd")
    real_run = stages.cluster.run

    def crash(ctx, params):
        real_run(ctx, params)  # all files written, manifest not yet
        raise RuntimeError("power cut")

    monkeypatch.setattr(stages.cluster, "run", crash)
    with pytest.raises(RuntimeError):
        _run(images, tmp_path / "wd", "cluster.k=4")
    store = runner.Workdir(tmp_path / "wd").store
    bad_key = runner.stage_keys(tiny_config("cluster.k=4"), runner.scan_images(images)[0])["cluster"]
    assert store.lookup("cluster", bad_key) is None
    assert list((tmp_path / "wd" / "cache" / "cluster").glob(f"{bad_key}.tmp-*"))  # unfinished, never read
    assert read_json(tmp_path / "wd" / "state.json")["keys"] == good  # the last complete run stays current
    assert all(store.lookup(s, good[s]) for s in runner.STAGE_NAMES)
    monkeypatch.setattr(stages.cluster, "run", real_run)
    keys, done = _run(images, tmp_path / "wd", "cluster.k=4")
    assert done["cluster"] == "computed" and store.lookup("cluster", keys["cluster"])
    assert not list((tmp_path / "wd" / "cache" / "cluster").glob("*.tmp-*"))


def test_same_seed_gives_byte_identical_pseudo_masks(images, tmp_path):
    outputs = []
    for name in ("a", "b"):
        keys, _ = _run(images, tmp_path / name)
        entry = tmp_path / name / "cache" / "pseudo_masks" / keys["pseudo_masks"]
        outputs.append({p.relative_to(entry): p.read_bytes() for p in sorted((entry / "masks").rglob("*.png"))})
    assert outputs[0] == outputs[1] and len(outputs[0]) == 10


def test_bad_images_are_skipped_with_a_reason_and_strict_stops(images, tmp_path):
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.png").write_text("not an image")
    good = (images / "shape_0001.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(good[: len(good) // 2])
    keys, _ = _run(images, tmp_path / "wd")
    skipped = {s["image"]: s["reason"] for s in _manifest(tmp_path / "wd", "saliency", keys)["skipped"]}
    assert set(skipped) == {"empty.jpg", "notes.png", "truncated.jpg"}
    assert "0 bytes" in skipped["empty.jpg"] and "not an image" in skipped["notes.png"]
    assert len(read_json(tmp_path / "wd" / "cache" / "pseudo_masks" / keys["pseudo_masks"] / "items.json")) == 10
    with pytest.raises(InputError, match="empty.jpg: empty file"):
        _run(images, tmp_path / "strict", "strict=true")


def test_unusual_image_modes_run_through(images, tmp_path):
    rgb = np.asarray(Image.open(images / "shape_0002.jpg"))
    Image.fromarray(rgb).convert("L").save(images / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(images / "rgba.png")
    Image.fromarray(rgb).convert("P").save(images / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(images / "cmyk.jpg")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(images / "sixteen.png")
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    rotated.save(images / "rotated.jpg", exif=exif)
    keys, _ = _run(images, tmp_path / "wd")
    assert _manifest(tmp_path / "wd", "saliency", keys)["skipped"] == []
    entry = tmp_path / "wd" / "cache" / "pseudo_masks" / keys["pseudo_masks"]
    with Image.open(entry / "masks" / "rotated.png") as mask:
        assert mask.size == (120, 160)  # EXIF orientation applied: portrait


@pytest.mark.parametrize("make", [lambda p: None, lambda p: p.mkdir()], ids=["missing", "empty"])
def test_missing_or_empty_folder_is_an_error_before_any_work(tmp_path, make):
    make(tmp_path / "photos")
    with pytest.raises(InputError, match="photos"):
        _run(tmp_path / "photos", tmp_path / "wd")
    assert not (tmp_path / "wd").exists()


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, **kwargs)


def test_cli_errors_exit_2_with_one_clear_line(tmp_path):
    (tmp_path / "photos").mkdir()
    result = _cli("run", "--images", tmp_path / "photos", "--workdir", tmp_path / "wd")
    assert result.returncode == 2 and "no images" in result.stderr and "Traceback" not in result.stderr
    result = _cli("run", "--images", tmp_path / "photos", "--workdir", tmp_path / "wd", "cluster.k=many")
    assert result.returncode == 2 and "cluster.k must be an integer" in result.stderr


def _folder_masks(images, masks):
    masks.mkdir()
    for image in images.iterdir():
        mask = np.zeros((120, 160), np.uint8)
        mask[20:100, 30:130] = 255
        cv2.imwrite(str(masks / f"{image.stem}.png"), mask)


@pytest.mark.slow
def test_kill_during_embed_resumes_without_recomputing_finished_shards(shapes_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(40):  # 40 images, one shard each, on a model slow enough to be caught mid-stage
        shutil.copy(shapes_dir / "images" / f"shape_{i % 10:04d}.jpg", images / f"img_{i:03d}.jpg")
    _folder_masks(images, tmp_path / "masks")
    args = ["--images", images, "--workers", "0", "backbone.name=mobilenet_v2", "backbone.weights=random",
            "saliency.method=folder", f"saliency.masks_dir={tmp_path / 'masks'}", "embed.shard_images=1",
            "embed.batch_size=4", "cluster.k=2", "cluster.niter=10", *[o for o in TINY if o.startswith("train.")]]
    shards = tmp_path / "wd" / "cache" / "embed" / "items"
    process = subprocess.Popen([sys.executable, str(ROOT / "run_pipeline.py"), "run", "--workdir", tmp_path / "wd", *args],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("*.json"))) < 3 and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in shards.glob("*")}
    assert 3 <= sum(name.endswith(".json") for name in finished) < 40, "the kill came too late to test resumption"
    assert _cli("run", "--workdir", tmp_path / "wd", *args).returncode == 0
    assert all((shards / name).stat().st_mtime_ns == mtime for name, mtime in finished.items())  # not recomputed
    state = read_json(tmp_path / "wd" / "state.json")
    manifest = read_json(tmp_path / "wd" / "cache" / "embed" / state["keys"]["embed"] / "manifest.json")
    assert manifest["counts"]["computed_images"] == 40 - sum(name.endswith(".json") for name in finished)
    assert _cli("stage", "embed", "--only", "--workdir", tmp_path / "fresh", *args).returncode == 0
    fresh = read_json(tmp_path / "fresh" / "state.json")
    resumed = np.load(tmp_path / "wd" / "cache" / "embed" / state["keys"]["embed"] / "embeddings.npy")
    uninterrupted = np.load(tmp_path / "fresh" / "cache" / "embed" / fresh["keys"]["embed"] / "embeddings.npy")
    assert resumed.shape == (40, 1280) and np.array_equal(resumed, uninterrupted)


def test_a_cached_rerun_imports_no_model_library(finished_run, tmp_path):
    # torchvision (it pulls in torch._dynamo) and timm cost seconds of a rerun that builds no model
    workdir, _, _ = finished_run
    shutil.copytree(workdir, tmp_path / "wd")
    images = read_json(workdir / "state.json")["images"]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import run_pipeline\n"
            "rc = run_pipeline.main(['run', '--images', sys.argv[2], '--workdir', sys.argv[3], *sys.argv[4:]])\n"
            "print(rc, sorted(m for m in ('torchvision', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), images, str(tmp_path / "wd"), *TINY],
                         capture_output=True, text=True, check=True).stdout
    assert "computed" not in out and out.strip().splitlines()[-1] == "0 []"
