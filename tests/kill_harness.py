"""Kill a pipeline run at random moments in every stage, restart it each time, and compare what it
finally produces with an uninterrupted run's. Used by tests/test_kill_anywhere.py (one kill per stage)
and benchmarks/kill_anywhere.py (many kills, several seeds)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.artifacts import writer_tag

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("saliency", "objects", "embed", "cluster", "pseudo_masks", "train")


def command(images: Path, workdir: Path, overrides: tuple[str, ...]) -> list[str]:
    return [sys.executable, str(ROOT / "run_pipeline.py"), "run", "--images", str(images), "--workdir", str(workdir), *overrides]


def _default_sigint() -> None:
    """A shell starts background jobs (CI's, nohup's) with SIGINT ignored, and children inherit that; the
    run must see Ctrl-C as a terminal would deliver it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _writing(workdir: Path, pid: int) -> str | None:
    """The stage process `pid` is writing (its `<key>.tmp-<host>-<pid>` entry folder exists), if any. Folders
    left by processes killed earlier have other pids, so they do not count."""
    for stage in STAGES:
        folder = workdir / "cache" / stage
        if folder.is_dir() and any(folder.glob(f"*.{writer_tag(pid)}")):
            return stage
    return None


def _finished(workdir: Path, stage: str) -> bool:
    folder = workdir / "cache" / stage
    return folder.is_dir() and any((p / "manifest.json").is_file() for p in folder.iterdir() if "." not in p.name)


def run_with_kills(images: Path, workdir: Path, overrides: tuple[str, ...], kills: list[tuple[str, float, int]],
                   timeout: float = 300) -> list[dict]:
    """For each (stage, delay, signal) whose stage is not finished yet: start the run, wait until it writes
    that stage, wait `delay` seconds more, send the signal to the whole process group; then run once more
    to the end. Returns what happened, with the stage each kill landed in."""
    log = []
    for stage, delay, signum in kills:
        if _finished(workdir, stage):  # an earlier kill landed after it
            continue
        process = subprocess.Popen(command(images, workdir, overrides), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True, preexec_fn=_default_sigint)
        deadline = time.monotonic() + timeout
        while _writing(workdir, process.pid) != stage and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        landed = _writing(workdir, process.pid)
        if process.poll() is None:
            os.killpg(process.pid, signum)
        out, err = process.communicate(timeout=timeout)
        hit = process.returncode in (-signal.SIGKILL, 130)
        log.append({"stage": stage, "landed_in": landed if hit else None, "delay": round(delay, 3),
                    "signal": signal.Signals(signum).name, "hit": hit, "returncode": process.returncode,
                    "stderr": err[-400:]})
    finished = subprocess.run(command(images, workdir, overrides), capture_output=True, text=True, timeout=timeout)
    if finished.returncode:
        raise RuntimeError(f"the run after the kills failed:\n{finished.stderr[-2000:]}")
    return log


def random_kills(seed: int, per_stage: int, max_delay: float, sigint_every: int = 5) -> list[tuple[str, float, int]]:
    """`per_stage` kills in each stage at random delays; every `sigint_every`-th is a Ctrl-C, the rest SIGKILL."""
    rng = random.Random(seed)
    kills = []
    for stage in STAGES:
        for _ in range(per_stage):
            signum = signal.SIGINT if (len(kills) + 1) % sigint_every == 0 else signal.SIGKILL
            kills.append((stage, rng.uniform(0, max_delay), signum))
    return kills


def artifacts(workdir: Path) -> dict[str, bytes]:
    """The bytes that must not depend on interruptions: saliency masks, embeddings, pseudo masks, and on the
    CPU the trained segmenter: its checkpoints' weights (the files also hold each epoch's seconds) and masks."""
    from pipeline.artifacts import read_json
    from pipeline.runner import Workdir
    from pipeline.segmenter import load_checkpoint

    entry = Workdir(workdir).latest_entry
    found = {f"pseudo_masks/{p.name}": p.read_bytes() for p in sorted((entry("pseudo_masks") / "masks").rglob("*.png"))}
    found["embeddings.npy"] = np.load(entry("embed") / "embeddings.npy").tobytes()
    for item in read_json(entry("saliency") / "items.json"):
        found[f"saliency/{item['image']}"] = (workdir / "cache" / "saliency" / "items" / f"{item['key']}.png").read_bytes()
    for checkpoint in ("best.pt", "latest.pt"):
        for name, tensor in load_checkpoint(entry("train") / checkpoint)["model"].items():
            found[f"train/{checkpoint}/{name}"] = tensor.numpy().tobytes()
    found |= {f"train/{p.name}": p.read_bytes() for p in sorted((entry("train") / "masks").glob("*.png"))}
    return found


def segmenter_miou(workdir: Path, labels: Path) -> float:
    from commands.evaluate import evaluate_workdir

    return evaluate_workdir(workdir, labels, "segmenter")["miou"]
