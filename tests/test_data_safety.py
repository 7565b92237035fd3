"""Issue 15: nothing a user owns is deleted, caches tell the truth, read-only commands only read, clear errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run_pipeline
from conftest import ROOT, quiet, tiny_config
from pipeline import runner
from pipeline.artifacts import read_json
from pipeline.errors import CacheCorruptError, InputError
from commands.evaluate import evaluate_workdir, metrics_file
from commands.export import export_id, export_workdir
from commands.predict import predict_folder
from commands.report import report_workdir


@pytest.fixture
def workdir(finished_run, tmp_path) -> Path:
    """A private copy of the finished tiny run (its images folder stays the session's)."""
    return Path(shutil.copytree(finished_run[0], tmp_path / "wd"))


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. nothing the user owns is deleted ----------------------------------------------------------

def test_report_out_refuses_a_folder_it_did_not_write_even_with_a_report_json(workdir, tmp_path, capsys):
    """The issue's reproduction: a report.json alone made any folder look like an earlier report."""
    user = tmp_path / "p"
    (user / "src").mkdir(parents=True)
    (user / "report.json").write_text("{}")
    (user / "src" / "code.py").write_text("print('mine')")
    before = _tree(user)
    assert run_pipeline.main(["report", "--workdir", str(workdir), "--out", str(user)]) == 2
    assert "src/code.py" in capsys.readouterr().err
    assert _tree(user) == before


def test_report_and_export_never_remove_a_folder_named_like_their_old_temporary_one(workdir, tmp_path):
    """They used to rmtree `<out>.tmp-<pid>` before starting, whoever had made it."""
    for name in ("report", "export"):
        mine = tmp_path / f"{name}.tmp-{os.getpid()}"
        mine.mkdir()
        (mine / "thesis.tex").write_text("months of work")
    report_workdir(workdir, tmp_path / "report")
    export_workdir(workdir, tmp_path / "export")
    for name in ("report", "export"):
        assert (tmp_path / f"{name}.tmp-{os.getpid()}" / "thesis.tex").read_text() == "months of work"
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["export", "export.tmp-%d" % os.getpid(), "report", "report.tmp-%d" % os.getpid(), "wd"]


def test_a_report_replaces_its_own_files_and_nothing_else(workdir, finished_run, tmp_path):
    out = tmp_path / "report"
    report_workdir(workdir, out, labels=finished_run[1], num_classes=5)
    assert (out / "plots" / "confusion.png").is_file()
    report_workdir(workdir, out)  # without labels: the confusion plot is no longer part of it
    assert not (out / "plots" / "confusion.png").exists()
    own = set(json.loads((out / "report.json").read_text())["files"])
    assert own == set(_tree(out))


# --- 2. files that are not used change no key ---------------------------------------------------------

def test_stray_files_in_the_photo_folder_change_no_key_and_are_still_reported(images, tmp_path, capsys):
    first = runner.run(tiny_config(), images, tmp_path / "wd", log=quiet)
    (images / "README.txt").write_text("my notes")
    (images / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    os.symlink(images / "gone.jpg", images / "dangling.jpg")
    lines = []
    assert runner.run(tiny_config(), images, tmp_path / "wd", log=lines.append) == first
    assert all(" cached " in line for line in lines)  # nothing recomputed
    err = capsys.readouterr().err
    assert "skipped README.txt: not an image file name" in err and "skipped dangling.jpg: broken symlink" in err
    left_out = {e["image"] for e in read_json(tmp_path / "wd" / "state.json")["left_out"]}
    assert left_out == {"README.txt", ".DS_Store", "dangling.jpg"}


# --- 5. a partial run keeps the last complete one reachable -------------------------------------------

def test_a_partial_run_leaves_the_last_complete_run_to_export_evaluate_report_and_status(workdir, finished_run, tmp_path):
    images = Path(read_json(workdir / "state.json")["images"])
    full = finished_run[2]
    partial = runner.run(tiny_config("cluster.k=2"), images, workdir, start="cluster", only=True, log=quiet)
    assert partial["cluster"] != full["cluster"]
    meta = export_workdir(workdir, tmp_path / "export")
    assert meta["artifact_keys"]["pseudo_masks"] == full["pseudo_masks"]
    assert meta["artifact_keys"]["cluster"] == full["cluster"] and meta["num_classes"] == 4  # k=3, not the partial k=2
    assert evaluate_workdir(workdir, finished_run[1], num_classes=5)["entry"] == full["pseudo_masks"]
    report_workdir(workdir, tmp_path / "report")
    status = {row["stage"]: row for row in runner.status(workdir)}
    assert status["pseudo_masks"]["key"] == meta["artifact_keys"]["pseudo_masks"]
    assert status["cluster"]["key"] == partial["cluster"]  # the newest run that reached it
    assert all(row["status"] == "cached" for row in status.values())


# --- 6. read-only commands only read ----------------------------------------------------------------

def _damage_a_pseudo_mask(workdir: Path, keys: dict) -> Path:
    entry = workdir / "cache" / "pseudo_masks" / keys["pseudo_masks"]
    mask = sorted((entry / "masks").iterdir())[0]
    data = bytearray(mask.read_bytes())
    data[-20] ^= 0xFF
    mask.write_bytes(bytes(data))
    return entry


def test_readers_report_a_damaged_entry_and_leave_its_repair_to_run(workdir, finished_run, tmp_path, capsys):
    keys = finished_run[2]
    entry = _damage_a_pseudo_mask(workdir, keys)
    before = _tree(workdir / "cache")
    rows = {row["stage"]: row["status"] for row in runner.status(workdir)}
    assert rows["pseudo_masks"] == "damaged" and rows["cluster"] == "cached"
    with pytest.raises(CacheCorruptError, match="damaged"):
        export_workdir(workdir, tmp_path / "export")
    with pytest.raises(CacheCorruptError, match="damaged"):
        evaluate_workdir(workdir, finished_run[1], num_classes=5)
    assert run_pipeline.main(["report", "--workdir", str(workdir), "--out", str(tmp_path / "report")]) == 2
    assert "damaged" in capsys.readouterr().err
    assert _tree(workdir / "cache") == before and entry.is_dir()  # nothing removed or rewritten
    images = Path(read_json(workdir / "state.json")["images"])
    assert runner.run(tiny_config(), images, workdir, log=quiet) == keys  # `run` repairs it under its lock
    assert {row["status"] for row in runner.status(workdir)} == {"cached"}


def _can_mount_read_only() -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount --bind /tmp /tmp && mount -o remount,bind,ro /tmp"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(shutil.which("unshare") is None or not _can_mount_read_only(),
                    reason="needs a private read-only bind mount (unshare -m, as root)")
def test_read_only_commands_work_on_a_read_only_workdir(workdir, finished_run, tmp_path):
    """As root, file modes do not stop writes: the workdir is bind-mounted read-only in a private mount namespace."""
    outside = tmp_path / "outside"
    commands = [f"status --workdir {workdir}",
                f"evaluate --workdir {workdir} --labels {finished_run[1]} --classes 5",
                f"export --workdir {workdir} --to {outside / 'export'}",
                f"report --workdir {workdir} --out {outside / 'report'}"]
    script = " && ".join([f"mount --bind {workdir} {workdir}", f"mount -o remount,bind,ro {workdir}",
                          *(f"{sys.executable} {ROOT / 'run_pipeline.py'} {c}" for c in commands)])
    before = _tree(workdir)
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "warning: metrics not saved" in done.stderr
    assert (outside / "export" / "meta.json").is_file() and (outside / "report" / "index.html").is_file()
    assert _tree(workdir) == before


# --- crashes where a clear error belongs -------------------------------------------------------------

def test_a_workdir_that_is_a_file_and_a_predict_out_that_is_a_file_are_one_line_errors(finished_run, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for command in (["status", "--workdir", str(afile)],
                    ["run", "--images", str(tmp_path), "--workdir", str(afile)],
                    ["predict", "--checkpoint", str(finished_run[0] / "cache" / "train" / finished_run[2]["train"] / "best.pt"),
                     "--images", str(finished_run[0].parent / "images"), "--out", str(afile)]):
        assert run_pipeline.main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a file" in err and "Traceback" not in err
    assert afile.read_text() == "not a folder"


def test_a_k_above_the_object_count_stops_before_embedding(images, tmp_path):
    with pytest.raises(InputError) as stopped:
        runner.run(tiny_config("cluster.k=200"), images, tmp_path / "wd", log=quiet)
    assert not (tmp_path / "wd" / "cache" / "embed").exists()
    assert stopped.match(r"cluster.k=200 but only \d+ objects were found in 10 images")


# --- wrong output without a word -----------------------------------------------------------------------

def test_evaluate_warns_on_partial_labels_keeps_one_result_per_label_folder_and_checks_the_class_count(
        workdir, finished_run, tmp_path, capsys):
    labels = finished_run[1]
    some = tmp_path / "some_labels"
    some.mkdir()
    for path in sorted(labels.iterdir())[:4]:
        shutil.copy(path, some / path.name)
    full = evaluate_workdir(workdir, labels, num_classes=5)
    assert "warning" not in capsys.readouterr().err
    partial = evaluate_workdir(workdir, some, num_classes=5)
    assert "labels for 4 of the 10 images" in capsys.readouterr().err
    assert partial["images_evaluated"] == 4 and full["images_evaluated"] == 10
    assert read_json(metrics_file(workdir, "pseudo_masks", labels))["images_evaluated"] == 10  # not overwritten
    assert read_json(metrics_file(workdir, "pseudo_masks", some))["images_evaluated"] == 4
    report = report_workdir(workdir, tmp_path / "report")
    html = report.read_text()
    assert "some_labels" in html and "6 without a label" in html
    with pytest.raises(InputError, match="class 4 is outside 0..3"):
        evaluate_workdir(workdir, labels, num_classes=4)


def test_predict_reports_the_files_it_leaves_out(finished_run, tmp_path, capsys):
    folder = tmp_path / "new"
    folder.mkdir()
    source = finished_run[0].parent / "images" / "shape_0001.jpg"
    shutil.copy(source, folder / "photo.jpg")
    Image.open(source).save(folder / "photo.png")  # same stem: one of them cannot be written
    os.symlink(folder / "missing.jpg", folder / "dangling.jpg")
    checkpoint = finished_run[0] / "cache" / "train" / finished_run[2]["train"] / "best.pt"
    summary = predict_folder(checkpoint, folder, tmp_path / "out", torch.device("cpu"))
    err = capsys.readouterr().err
    assert "skipped dangling.jpg: broken symlink" in err and "skipped photo.png: same name as photo.jpg" in err
    assert {e["image"] for e in summary["left_out"]} == {"dangling.jpg", "photo.png"}
    assert read_json(tmp_path / "out" / "predict.json")["left_out"] == summary["left_out"]
    with pytest.raises(InputError, match=r"dangling.jpg: broken symlink \(strict mode"):
        predict_folder(checkpoint, folder, tmp_path / "strict", torch.device("cpu"), strict=True)


def test_export_ids_are_safe_for_list_files_and_map_back_to_the_photos(images, tmp_path):
    shutil.move(images / "shape_0003.jpg", images / "my photo é 日本.jpg")
    runner.run(tiny_config(), images, tmp_path / "wd", log=quiet)
    meta = export_workdir(tmp_path / "wd", tmp_path / "export")
    ids = (tmp_path / "export" / "train.txt").read_text().split() + (tmp_path / "export" / "val.txt").read_text().split()
    assert len(ids) == 10 and all(i.isascii() for i in ids)
    renamed = export_id("my photo é 日本.jpg")
    assert renamed in ids and " " not in renamed and meta["image_of_id"][renamed] == "my photo é 日本.jpg"
    assert (tmp_path / "export" / "images" / f"{renamed}.jpg").is_file()
    assert export_id("a/shape_0001.jpg") == "a/shape_0001"  # plain names are kept as they are
    assert export_id("a b.jpg") != export_id("a_b.jpg")
    assert np.unique(list(meta["image_of_id"].values())).size == 10
