"""Kill harness, long version: many SIGKILLs (and some Ctrl-C) at random moments in every stage, over
several seeds; after each series the restarted run must give the uninterrupted run's bytes.

    python benchmarks/kill_anywhere.py [--seeds 3] [--per-stage 2] [--images 16]

Prints one line per seed (kills that landed, by stage and signal; identical or not) and a total.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from commands.demo import make_shapes  # noqa: E402
from tests.conftest import TINY  # noqa: E402
from tests.kill_harness import artifacts, random_kills, run_with_kills, segmenter_miou  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--per-stage", type=int, default=2)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--max-delay", type=float, default=0.03, help="seconds after a stage starts (cluster takes ~0.1 s)")
    args = parser.parse_args()
    overrides = (*TINY, "train.epochs=3")
    failures, landed = 0, collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_shapes(tmp / "data", args.images, size=(160, 120))
        run_with_kills(tmp / "data" / "images", tmp / "reference", overrides, kills=[])
        expected = artifacts(tmp / "reference")
        expected_miou = segmenter_miou(tmp / "reference", tmp / "data" / "labels")
        for seed in range(args.seeds):
            started = time.perf_counter()
            workdir = tmp / f"killed-{seed}"
            log = run_with_kills(tmp / "data" / "images", workdir, overrides,
                                 random_kills(seed, args.per_stage, args.max_delay))
            hits = [e for e in log if e["hit"]]
            landed.update((e["landed_in"], e["signal"]) for e in hits)
            same = artifacts(workdir) == expected
            miou = segmenter_miou(workdir, tmp / "data" / "labels")
            ok = same and abs(miou - expected_miou) <= 0.02
            failures += not ok
            print(f"seed {seed}: {len(hits)}/{len(log)} kills landed, bytes identical: {same}, segmenter mIoU "
                  f"{miou:.4f} vs {expected_miou:.4f} uninterrupted, {time.perf_counter() - started:.0f}s", flush=True)
            for e in log:
                print(f"  planned in {e['stage']:<12} +{e['delay']:.3f}s  {e['signal']:<7} landed in {e['landed_in']}"
                      f"  exit {e['returncode']}", flush=True)
    print(f"total kills landed: {sum(landed.values())}; by stage and signal: {dict(sorted(landed.items()))}")
    print("PASS" if not failures else f"FAIL: {failures} of {args.seeds} seeds differ")
    return int(bool(failures))


if __name__ == "__main__":
    sys.exit(main())
