"""The segmenter on photos it never saw: train on one part of a labelled folder, segment the other, score.

  python3 benchmarks/segmenter_holdout.py --train $V/train --val $V/val --workdir WD --seeds 0 1 2 \
      [--arm NAME "OVERRIDES"]... -- COMMON_OVERRIDES...
  python3 benchmarks/segmenter_holdout.py --data $V --folds 5 --workdir WD ... (cross-validation)

$V/train and $V/val each hold images/ and labels/. For each seed and arm, the pipeline runs up to
`train` on train/images (labels are never read there); each round's checkpoint then segments
val/images, and the masks are scored against val/labels with the Hungarian matching computed on the val
photos alone, as an outside judge would. The pseudo masks are scored on the train photos they were made
for (the bar the segmenter must clear), and on random subsets of them as large as the val part (the
same bar, matched on as few photos as the val score is; `pseudo_mask_bars`). Each checkpoint is scored
with its own inference options, without its region votes (which read the val photos' saliency masks,
made in WD/val-saliency as `predict` makes them), and with each test-time option alone (flip only,
multi-scale, refined; `--no-test-time-variants` skips the last two), on the run's `device`.
Frozen-trunk features do not depend on the arm or seed, so one process computes them once (training's,
through `cached_views`, and the val photos'). Prints one JSON line per (seed, arm, round), then means and
spreads over seeds.

With `--data DIR --folds N` every photo of DIR (images/, labels/) is held out once: fold f holds out the
photos whose stem's sha256 is f modulo N (links in WD/folds/f/), the other folds' photos train; a seed's
figure is then the mean over the folds (each fold's Hungarian matching on its own held-out photos), so a
setting is judged on all of DIR's photos rather than on one small part.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stages.train  # noqa: E402
from pipeline import runner  # noqa: E402
from pipeline.runner import load_config  # noqa: E402

from pipeline.images import load_rgb, read_label_png, scan_images  # noqa: E402
from pipeline.refine import RefineParams  # noqa: E402
from pipeline.segmenter import Inference, segmenter_from_checkpoint  # noqa: E402
from pipeline.outputs import class_count, read_items, read_mask  # noqa: E402
from commands.evaluate import VOC_CLASSES, accumulate, label_files, read_pair, scores  # noqa: E402
from commands.predict import saliency_masks  # noqa: E402

MULTI_SCALE = (0.75, 1.0, 1.25)


def hungarian_miou(pairs, num_predicted: int, num_classes: int = VOC_CLASSES) -> float:
    """Hungarian mIoU of (predicted, truth) label arrays, the matching computed on these photos alone."""
    confusion = np.zeros((256, 256), np.int64)
    for predicted, truth in pairs:
        accumulate(confusion, predicted, truth)
    return scores(confusion, num_predicted, num_classes)["hungarian"]["miou"]


def pseudo_mask_bars(entry: Path, labels_dir: Path, size: int, draws: int = 200) -> tuple[float, float]:
    """A pseudo_masks `entry`'s Hungarian mIoU on all the photos they were made for (the bar, as `evaluate`
    scores it), and averaged over `draws` random (seeded) `size`-photo subsets of them, each matched on its own
    as the held-out photos are: the bar at the held-out part's size. Matching fits a few photos better than
    many, so the second is higher (on VOC-330's five folds by 1.4 points on average, seeds 0-2)."""
    items = read_items(entry)
    labels = label_files(labels_dir, [item["image"] for item in items])
    rows = np.r_[0:class_count(entry), 255]  # the ids a pseudo mask can hold; the rest of a confusion is zero
    per_photo = []
    for item in items:
        confusion = np.zeros((256, 256), np.int64)
        accumulate(confusion, *read_pair(entry / item["mask"], labels[item["image"]]))
        per_photo.append(confusion[rows, :VOC_CLASSES])
    per_photo, rng = np.stack(per_photo), np.random.default_rng(0)

    def miou(photos) -> float:
        total = np.zeros((256, 256), np.int64)
        total[rows, :VOC_CLASSES] = per_photo[photos].sum(axis=0)
        return scores(total, len(rows) - 1, VOC_CLASSES)["hungarian"]["miou"]
    at_size = [miou(rng.choice(len(per_photo), size, replace=False)) for _ in range(draws)]
    return miou(slice(None)), float(np.mean(at_size))


def variants(own: Inference, every: bool) -> dict[str, Inference]:
    """The checkpoint's own inference, and without its region votes; the plain one (one scale and its mirror,
    not refined, not voted); with `every`, also multi-scale and refined alone."""
    plain = dataclasses.replace(own, scales=(1.0,), refine=RefineParams(), region_vote=False)
    chosen = {"own": own, "unvoted": dataclasses.replace(own, region_vote=False), "flip": plain}
    if every:
        chosen.update({"multiscale": dataclasses.replace(plain, scales=MULTI_SCALE),
                       "refined": dataclasses.replace(plain, refine=RefineParams("guided"))})
    return {name: inference for name, inference in chosen.items() if name == "own" or inference != own}


def memoised_views():
    """stages.train.cached_views computed once per (images, trunk, views) in this process."""
    real, memo = stages.train.cached_views, {}

    def cached(job):
        key = (tuple(job.images), job.params.backbone, job.params.weights, job.params.inference.short_side,
               job.params.scales)
        if key not in memo:
            started = time.perf_counter()
            memo[key] = real(job)
            print(json.dumps({"trunk_features_s": round(time.perf_counter() - started, 1)}), flush=True)
        return memo[key]
    return cached


def score_checkpoint(checkpoint: Path, val: Path, val_views: dict, every: bool, saliency_work: Path,
                     device: torch.device) -> dict:
    """Held-out mIoU of each inference variant; region votes read the val photos' saliency masks, made in
    `saliency_work` with the checkpoint's run settings as `predict` makes them."""
    model, payload = segmenter_from_checkpoint(checkpoint, device)
    records = scan_images(val / "images")[0]
    labels = label_files(val / "labels", [r.rel for r in records])
    own = Inference.from_dict(payload["inference"])
    foreground = {rel: read_mask(path) for rel, path in saliency_masks(
        payload, val / "images", saliency_work, device).items()} if own.region_vote else {}
    row = {}
    for name, inference in variants(own, every).items():
        started, pairs = time.perf_counter(), []
        for record in records:
            rgb = load_rgb(record.path)
            views = None
            if payload["config"]["trunk"] == "frozen":  # the trunk is the one val_views were made with
                key = (record.rel, inference.short_side)
                if key not in val_views:
                    val_views[key] = model.view_features(rgb, dataclasses.replace(inference, scales=MULTI_SCALE))
                pairs_of = zip(val_views[key][::2], val_views[key][1::2])  # (view, its mirror) per scale
                views = [v for scale, pair in zip(MULTI_SCALE, pairs_of) if scale in inference.scales for v in pair]
            mask = foreground.get(record.rel) if inference.region_vote else None
            predicted, _ = model.predict(rgb, inference, views, mask)
            pairs.append((predicted, read_label_png(labels[record.rel])))
        row[name] = round(hungarian_miou(pairs, payload["num_classes"]), 4)
        row[f"{name}_s"] = round(time.perf_counter() - started, 1)
    return row


def fold_splits(data: Path, folds: int, workdir: Path) -> list[tuple[Path, Path]]:
    """(train, val) folders of links for each fold of `data` (images/, labels/): a photo is in fold
    int(sha256(stem), 16) % folds, a rule that does not move when photos are added."""
    records = scan_images(data / "images")[0]
    fold_of = {r.rel: int(hashlib.sha256(Path(r.rel).stem.encode()).hexdigest(), 16) % folds for r in records}
    splits = []
    for fold in range(folds):
        root = workdir / "folds" / str(fold)
        for record in records:
            stem = Path(record.rel).stem
            part = root / ("val" if fold_of[record.rel] == fold else "train")
            for source, link in [(record.path, part / "images" / record.rel),
                                 (data / "labels" / f"{stem}.png", part / "labels" / f"{stem}.png")]:
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.is_symlink():
                    link.symlink_to(Path(source).resolve())
        splits.append((root / "train", root / "val"))
    return splits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, help="train/ of a fixed split (with --val)")
    parser.add_argument("--val", type=Path)
    parser.add_argument("--data", type=Path, help="a labelled folder to cross-validate on (with --folds)")
    parser.add_argument("--folds", type=int, default=0)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arm", nargs=2, action="append", metavar=("NAME", "OVERRIDES"), default=[])
    parser.add_argument("--no-test-time-variants", action="store_true",
                        help="score round 1 without multi-scale and refined alone (refinement needs OpenCV's contrib)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if (args.folds > 1) == bool(args.train and args.val) or (args.folds > 1) != bool(args.data):
        parser.error("give either --train and --val, or --data and --folds N (N >= 2)")
    splits = fold_splits(args.data, args.folds, args.workdir) if args.folds else [(args.train, args.val)]
    stages.train.cached_views = memoised_views()
    val_views, results = {}, []
    for fold, (train, val) in enumerate(splits):
        val_size = len(scan_images(val / "images")[0])
        for seed in args.seeds:
            for arm, extra in args.arm or [("default", "")]:
                cfg = load_config(overrides=[*args.overrides, *extra.split(), f"seed={seed}"])
                started = time.perf_counter()
                keys = runner.run(cfg, train / "images", args.workdir, log=lambda *a, **k: None)
                seconds = time.perf_counter() - started
                pseudo, pseudo_sized = pseudo_mask_bars(args.workdir / "cache" / "pseudo_masks" / keys["pseudo_masks"],
                                                        train / "labels", val_size)
                entry = args.workdir / "cache" / "train" / keys["train"]
                for checkpoint in sorted(entry.glob("round*.pt")) + [entry / "latest.pt"]:
                    log = torch.load(checkpoint, weights_only=True)["log"]
                    row = {"fold": fold, "seed": seed, "arm": arm, "checkpoint": checkpoint.name,
                           "pseudo_masks_on_train": round(pseudo, 4),
                           "pseudo_masks_on_train_at_val_size": round(pseudo_sized, 4), "run_s": round(seconds, 1),
                           "epochs_s": round(sum(r["seconds"] for r in log), 1),
                           **score_checkpoint(checkpoint, val, val_views, every=checkpoint.name == "round1.pt"
                                              and not args.no_test_time_variants,
                                              saliency_work=args.workdir / "val-saliency",
                                              device=runner.resolve_device(cfg.device))}
                    print(json.dumps(row), flush=True)
                    results.append(row)
    for arm in dict.fromkeys(r["arm"] for r in results):
        for checkpoint in dict.fromkeys(r["checkpoint"] for r in results if r["arm"] == arm):
            rows = [fold_mean([r for r in results if (r["arm"], r["checkpoint"], r["seed"]) == (arm, checkpoint, seed)])
                    for seed in dict.fromkeys(r["seed"] for r in results if (r["arm"], r["checkpoint"]) == (arm, checkpoint))]
            summary = {name: f"{statistics.mean(r[name] for r in rows):.4f} "
                             f"(spread {max(r[name] for r in rows) - min(r[name] for r in rows):.4f})"
                       for name in rows[0] if isinstance(rows[0][name], float) and not name.endswith("_s")}
            print(json.dumps({"arm": arm, "checkpoint": checkpoint, "seeds": [r["seed"] for r in rows], **summary}))
    return 0


def fold_mean(rows: list[dict]) -> dict:
    """One seed's row: each score's mean over the folds (a fixed split has one)."""
    shared = set.intersection(*(set(r) for r in rows))
    return {name: statistics.mean(r[name] for r in rows) if isinstance(value, float) else value
            for name, value in rows[0].items() if name in shared}


if __name__ == "__main__":
    sys.exit(main())
