"""Pseudo-label ablation: each ingredient on and off, pseudo-mask mIoU over seeds, purity and NMI.

For every row (a list of `section.key=value` overrides on top of the defaults) and seed, runs
  run_pipeline.py stage pseudo_masks --only --hash-content --images IMAGES --workdir WD <base> <row> seed=S
(stages whose inputs did not change come from WD's cache), then scores the run's pseudo masks:
Hungarian mIoU over all images (`evaluate`'s `miou`) and over each half of them (an image is in half
A when sha256 of its name is even), and the purity and NMI of the cluster assignment against each
object's majority ground-truth class (benchmarks/clustering.py's `real` and `scores`). Prints one
line per row: mean, spread (min-max) over the seeds, halves, purity, NMI, ignored pixel share and the
seconds of the stages the row recomputed. `--json` also writes every figure.

  python3 benchmarks/pseudo_label_ablation.py --workdir WD --images $V/images --labels $V/labels \\
      --base "backbone.name=mobilenet_v2 backbone.weights=$M/mobilenetv2_imagenet_bottleneck.pt saliency.method=onnx saliency.model=$M/isnet_fp16.onnx" \\
      [--rows NAME ...] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# What version 1 of the stages did, whatever the defaults are now: the rows below start from it.
V1 = ["cluster.method=kmeans", "objects.crop_size=224", "embed.views=[context]", "embed.flip=false",
      "embed.layers=1", "cluster.pca_dim=0", "cluster.whiten=false", "cluster.overcluster=1",
      "cluster.reliability=distance", "cluster.core_fraction=0.8", "objects.small_components=ignore",
      "objects.refine.method=none", "cluster.neighbours=30", "cluster.same_photo=0",
      "embed.pooling=[crop]"]
SPECTRAL = [*V1, "cluster.method=spectral"]
ROWS = {
    "v1 k-means": V1,
    "v1 spectral": SPECTRAL,
    "auto (spectral here)": [*V1, "cluster.method=auto"],
    "+ crop 256": [*SPECTRAL, "objects.crop_size=256"],
    "+ grey background": [*SPECTRAL, "embed.views=[grey]"],
    "+ blurred background": [*SPECTRAL, "embed.views=[blur]"],
    "+ context and grey averaged": [*SPECTRAL, "embed.views=[context,grey]"],
    "+ context and blur averaged": [*SPECTRAL, "embed.views=[context,blur]"],
    "+ flip": [*SPECTRAL, "embed.flip=true"],
    "+ 2 layers": [*SPECTRAL, "embed.layers=2"],
    "+ 3 layers": [*SPECTRAL, "embed.layers=3"],
    "+ object pooling": [*SPECTRAL, "embed.pooling=[crop,object]"],
    "+ margin 0": [*SPECTRAL, "objects.margin=0.0"],
    "+ margin 0.2": [*SPECTRAL, "objects.margin=0.2"],
    "+ PCA 50": [*SPECTRAL, "cluster.pca_dim=50"],
    "+ PCA 50 whitened": [*SPECTRAL, "cluster.pca_dim=50", "cluster.whiten=true"],
    "+ 10 neighbours": [*SPECTRAL, "cluster.neighbours=10"],
    "+ overcluster 2": [*SPECTRAL, "cluster.overcluster=2"],
    "+ reliability neighbours": [*SPECTRAL, "cluster.reliability=neighbours"],
    "+ core_fraction 1 (no ignore)": [*SPECTRAL, "cluster.core_fraction=1.0"],
    "+ same-photo edges": [*SPECTRAL, "cluster.same_photo=1"],
    "+ small components to nearest object": [*SPECTRAL, "objects.small_components=nearest"],
    "+ small components to background": [*SPECTRAL, "objects.small_components=background"],
    "+ refine guided": [*SPECTRAL, "objects.refine.method=guided"],
    "+ refine global": [*SPECTRAL, "objects.refine.method=global"],
    "defaults": [],
}


def run_row(args, overrides: list[str], seed: int) -> dict:
    command = [sys.executable, "run_pipeline.py", "stage", "pseudo_masks", "--only", "--hash-content",
               "--images", str(args.images), "--workdir", str(args.workdir), *shlex.split(args.base), *overrides,
               f"seed={seed}"]
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        raise SystemExit(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}")
    printed = done.stdout
    return {"command": shlex.join(command[1:]), "recomputed": _recomputed_seconds(printed), **score(args.workdir, args.labels)}


def _recomputed_seconds(printed: str) -> dict[str, float]:
    """{stage: seconds} of the stages the run computed, from lines like `embed  computed  <key>  15.1s ...`."""
    seconds = {}
    for line in printed.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] == "computed" and parts[3].endswith("s"):
            seconds[parts[0]] = float(parts[3][:-1])
    return seconds


def score(workdir: Path, labels_dir: Path) -> dict:
    from clustering import real, scores
    from commands import evaluate
    from pipeline.artifacts import read_json
    from pipeline.outputs import ITEMS
    from pipeline.runner import Workdir

    metrics = evaluate.evaluate_workdir(workdir, labels_dir)
    wd = Workdir(workdir)
    entry = wd.latest_entry("pseudo_masks")
    items = read_json(entry / ITEMS)
    labels = evaluate.label_files(labels_dir, [i["image"] for i in items])
    halves = {}
    for half in (0, 1):
        chosen = [i for i in items if int(hashlib.sha256(i["image"].encode()).hexdigest(), 16) % 2 == half]
        confusion, predicted, classes = evaluate.entry_confusion(entry, chosen, labels)
        halves["AB"[half]] = evaluate.scores(confusion, predicted, classes)["hungarian"]["miou"]
    _, truth = real(workdir, labels_dir)
    assignment = np.load(wd.latest_entry("cluster") / "assignments.npy")
    purity, nmi = scores(truth, assignment)
    return {"miou": metrics["miou"], "halves": halves, "purity": purity, "nmi": nmi,
            "ignored": metrics["ignored_prediction_fraction"]}


def summary(name: str, runs: list[dict]) -> str:
    def stats(values):
        return f"{np.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f} ({min(values):.3f}-{max(values):.3f})"
    seconds = {}
    for run in runs:
        for stage, value in run["recomputed"].items():
            seconds.setdefault(stage, []).append(value)
    timing = ", ".join(f"{stage} {max(values):.1f}s" for stage, values in seconds.items())
    return (f"{name:38s} mIoU {stats([r['miou'] for r in runs])}  A {np.mean([r['halves']['A'] for r in runs]):.3f}"
            f"  B {np.mean([r['halves']['B'] for r in runs]):.3f}  purity {np.mean([r['purity'] for r in runs]):.3f}"
            f"  NMI {np.mean([r['nmi'] for r in runs]):.3f}  ignored {np.mean([r['ignored'] for r in runs]):.3f}"
            f"  per seed {' '.join(format(r['miou'], '.3f') for r in runs)}  [{timing}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--base", default="", help="overrides every row shares (model paths, saliency)")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help=f"row names (default all): {', '.join(ROWS)}")
    parser.add_argument("--extra", nargs="*", default=[], help="an extra row: overrides on top of the defaults")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    rows = {name: ROWS[name] for name in args.rows}
    if args.extra:
        rows = {"extra: " + " ".join(args.extra): args.extra}
    results = {}
    for name, overrides in rows.items():
        runs = [run_row(args, overrides, seed) for seed in args.seeds]
        results[name] = runs
        print(summary(name, runs), flush=True)
        print(f"    {runs[0]['command']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
