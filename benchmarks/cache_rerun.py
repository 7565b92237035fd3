"""Cache benchmark: wall time of a first run, a no-change rerun and a `cluster.k` change, side by side.

    python benchmarks/cache_rerun.py [--images 200] [section.key=value ...]

Each run is the real CLI in a fresh process (imports included), on generated sample images, with
the tiny random ViT unless overridden. Prints each time and its ratio to the first run.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from commands.demo import make_shapes  # noqa: E402

DEFAULTS = ["backbone.name=vit_tiny_random", "train.backbone=vit_tiny_random", "train.epochs=1",
            "train.crop_size=128", "train.base_size=128", "cluster.k=4"]


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        images, _ = make_shapes(Path(tmp) / "data", args.images)
        common = ["--images", str(images), "--workdir", str(Path(tmp) / "wd"), *DEFAULTS, *args.overrides]
        first = timed(["run", *common])
        rerun = timed(["run", *common])
        new_k = timed(["stage", "pseudo_masks", "--only", *common, "cluster.k=6"])
    print(f"{args.images} images; first run {first:.1f}s")
    print(f"no-change rerun   {rerun:7.2f}s  ratio {rerun / first:.3f}  (goal <= 0.02)")
    print(f"cluster.k change  {new_k:7.2f}s  ratio {new_k / first:.3f}  (cluster + pseudo_masks only)")


if __name__ == "__main__":
    main()
