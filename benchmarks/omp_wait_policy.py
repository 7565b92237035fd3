"""OpenMP wait policy: the cluster and embed stages' compute with OMP_WAIT_POLICY unset, PASSIVE, and as
the pipeline loads faiss (`pipeline/faiss_runtime.py`: faiss's own runtime PASSIVE, torch's unset), on a
quiet machine and on one where other processes keep every core busy (a shared server, a CI runner).

    python benchmarks/omp_wait_policy.py [--objects 5000 100000] [--repeats 3]

By default OpenMP threads spin while they wait for work. faiss's k-means runs many short parallel
regions; when another process holds a core, the spinning thread holding it back is descheduled and
every region waits for it. PASSIVE threads sleep instead. The policy is read once, when the OpenMP
library loads, so each measurement is a fresh process. Variants: `unset` and `PASSIVE` import torch
first (then faiss binds to torch's runtime; `unset` is how the stages ran before faiss_runtime),
with the variable set for the whole process; `pipeline` imports the `pipeline` package first and
leaves the variable unset, as the CLI does now.
Workloads: the cluster stage's `spherical_kmeans` (k=20, default Params) on synthetic L2-normalised
384-D vectors, and the embed stage's forward pass (`stages.embed._forward`) of a random ViT-S/16 on
a batch of 64 crops. "Loaded" starts one busy-looping process per core for the measurement.
Prints the best of --repeats for each, and unset / PASSIVE and unset / pipeline ratios (> 1: faster
than unset).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASURE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
if sys.argv[4] == "pipeline":
    import pipeline
import numpy as np, torch
from stages import cluster, embed
from pipeline.backbones import RANDOM, BackboneParams, build_backbone
workload, size = sys.argv[2], int(sys.argv[3])
if workload == "kmeans":
    x = np.random.default_rng(0).normal(size=(size, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    call = lambda: cluster.spherical_kmeans(x, cluster.Params(k=20), 0)
else:
    backbone = build_backbone(BackboneParams("dino_vits16", RANDOM))
    crops = torch.randint(0, 256, (size, 3, 224, 224), dtype=torch.uint8)
    call = lambda: embed._forward(backbone, crops, torch.device("cpu"))
call()  # warm-up
started = time.perf_counter(); call()
print(json.dumps(time.perf_counter() - started))
"""
BUSY = "while True: pass"


VARIANTS = ("unset", "PASSIVE", "pipeline")


def measure(workload: str, size: int, variant: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if variant == "PASSIVE":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run([sys.executable, "-c", MEASURE, str(ROOT), workload, str(size), variant], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, nargs="+", default=[5000, 100000], help="k-means sizes")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    workloads = [("kmeans", n) for n in args.objects] + [("vit_s16_forward", 64)]
    print(f"{'condition':9s} {'workload':22s} {'unset s':>9s} {'PASSIVE s':>10s} {'pipeline s':>11s} "
          f"{'unset/PASSIVE':>14s} {'unset/pipeline':>15s}")
    for condition in ("quiet", "loaded"):
        hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(os.cpu_count() if condition == "loaded" else 0)]
        try:
            for workload, size in workloads:
                times = {variant: min(measure(workload, size, variant) for _ in range(args.repeats))
                         for variant in VARIANTS}
                print(f"{condition:9s} {f'{workload} n={size}':22s} {times['unset']:9.3f} {times['PASSIVE']:10.3f} "
                      f"{times['pipeline']:11.3f} {times['unset'] / times['PASSIVE']:14.2f} "
                      f"{times['unset'] / times['pipeline']:15.2f}", flush=True)
        finally:
            for hog in hogs:
                hog.kill()


if __name__ == "__main__":
    main()
