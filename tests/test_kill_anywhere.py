"""Killed at any moment in any stage (SIGKILL, or Ctrl-C), a restarted run ends with the same bytes."""
from __future__ import annotations

import signal
import shutil

import pytest

from tests.conftest import TINY
from tests.kill_harness import STAGES, artifacts, random_kills, run_with_kills, segmenter_miou

OVERRIDES = (*TINY, "train.epochs=3")


@pytest.mark.slow
def test_a_kill_in_every_stage_then_a_restart_gives_the_uninterrupted_result(shapes_dir, tmp_path):
    images = shutil.copytree(shapes_dir / "images", tmp_path / "images")
    run_with_kills(images, tmp_path / "reference", OVERRIDES, kills=[])
    kills = random_kills(seed=0, per_stage=1, max_delay=0.02, sigint_every=3)  # short: cluster takes ~0.1 s
    log = run_with_kills(images, tmp_path / "killed", OVERRIDES, kills)
    assert {entry["landed_in"] for entry in log} == set(STAGES)  # at least one kill inside every stage
    for entry in log:
        if entry["hit"] and entry["signal"] == "SIGINT":  # Ctrl-C: a clean exit that says how to resume
            assert entry["returncode"] == 130 and "run the same command again to resume" in entry["stderr"]
            assert "Traceback" not in entry["stderr"]
        elif entry["hit"]:
            assert entry["returncode"] == -signal.SIGKILL
    assert artifacts(tmp_path / "killed") == artifacts(tmp_path / "reference")
    miou = segmenter_miou(tmp_path / "killed", shapes_dir / "labels")
    assert miou == pytest.approx(segmenter_miou(tmp_path / "reference", shapes_dir / "labels"), abs=0.02)
