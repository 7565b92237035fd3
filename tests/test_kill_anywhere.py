"""Killed at any moment in any stage (SIGKILL, or Ctrl-C), a restarted run ends with the same bytes and,
on the CPU, the same trained weights."""
from __future__ import annotations

import signal
import shutil

import pytest

from tests.conftest import TINY
from tests.kill_harness import STAGES, artifacts, random_kills, run_with_kills

OVERRIDES = (*TINY, "train.epochs=3")


def _differing(found: dict[str, bytes], expected: dict[str, bytes]) -> list[str]:
    return sorted(name for name in found.keys() | expected.keys() if found.get(name) != expected.get(name))


@pytest.mark.slow
def test_a_kill_in_every_stage_then_a_restart_gives_the_uninterrupted_result(shapes_dir, tmp_path):
    images = shutil.copytree(shapes_dir / "images", tmp_path / "images")
    run_with_kills(images, tmp_path / "reference", OVERRIDES, kills=[])
    expected = artifacts(tmp_path / "reference")
    assert any(name.startswith("train/latest.pt/") for name in expected)

    # SIGKILL only, as soon as each stage starts writing: objects on 10 images is over in tens of ms
    kills = random_kills(seed=0, per_stage=1, max_delay=0.0, sigint_every=len(STAGES) + 1)
    log = run_with_kills(images, tmp_path / "killed", OVERRIDES, kills)
    assert {entry["landed_in"] for entry in log} == set(STAGES)  # one kill inside every stage (cluster: ~0.1 s)
    assert all(entry["returncode"] == -signal.SIGKILL for entry in log)
    assert _differing(artifacts(tmp_path / "killed"), expected) == []

    (ctrl_c,) = run_with_kills(images, tmp_path / "interrupted", OVERRIDES, [("embed", 0.01, signal.SIGINT)])
    assert ctrl_c["returncode"] == 130 and "run the same command again to resume" in ctrl_c["stderr"]
    assert "Traceback" not in ctrl_c["stderr"]
    assert _differing(artifacts(tmp_path / "interrupted"), expected) == []
