"""Scaling benchmark: wall time and peak memory of the pipeline up to the pseudo masks as the folder grows.

    python benchmarks/scaling.py [--sizes 1000 5000 10000] [section.key=value ...]

Generates the largest set of small sample images once (160x120), links the first N of them into a
folder for each size, and runs `stage pseudo_masks --only` in a fresh process per size (tiny random
ViT unless overridden). Peak RSS is the largest of the run's processes (main or DataLoader worker),
read from getrusage. Prints each size and its ratios to the smallest (goal: RSS grows <= 10% from
the smallest to the largest; time grows linearly).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from commands.demo import make_shapes  # noqa: E402

DEFAULTS = ["backbone.name=vit_tiny_random", "saliency.input_size=112", "cluster.k=4"]
# Runs the CLI in a child and reports the child's wall time and peak RSS (KiB on Linux).
MEASURE = ("import json, resource, subprocess, sys, time\n"
           "t = time.perf_counter(); subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
           "print(json.dumps({'seconds': time.perf_counter() - t,\n"
           "                  'rss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")


def measure(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, str(ROOT / "run_pipeline.py"), *args],
                         check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        images, _ = make_shapes(tmp / "data", max(args.sizes), size=(160, 120))
        print(f"generated {max(args.sizes)} images in {time.perf_counter() - started:.0f}s", flush=True)
        sources = sorted(images.iterdir())
        rows = []
        for size in sorted(args.sizes):
            folder = tmp / f"n{size}"
            folder.mkdir()
            for source in sources[:size]:
                (folder / source.name).symlink_to(source)
            result = measure(["stage", "pseudo_masks", "--only", "--images", str(folder), "--workdir",
                              str(tmp / f"wd{size}"), *DEFAULTS, *args.overrides])
            rows.append((size, result["seconds"], result["rss_kib"] / 1024))
            print(f"{size:7d} images  {result['seconds']:8.1f}s  {1000 * result['seconds'] / size:6.2f}s per 1k  "
                  f"peak RSS {result['rss_kib'] / 1024:7.0f} MiB", flush=True)
    size0, seconds0, rss0 = rows[0]
    for size, seconds, rss in rows[1:]:
        print(f"{size} vs {size0}: images x{size / size0:.1f}, time x{seconds / seconds0:.2f}, peak RSS x{rss / rss0:.3f}"
              f" (goal <= 1.10)")


if __name__ == "__main__":
    main()
