#!/usr/bin/env python3
"""Command line: parse, build the config, call the runner. `python run_pipeline.py --help`."""
from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

from pipeline.errors import PipelineError

DEFAULT_WORKDIR = "runs/default"
CREATES_WORKDIR = ("run", "stage", "demo")  # the other commands log only into a workdir that exists


def _common(parser: argparse.ArgumentParser, images: bool = True) -> None:
    if images:
        parser.add_argument("--images", required=True, help="folder of photos (searched recursively)")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"where the cache and results live [{DEFAULT_WORKDIR}]")
    parser.add_argument("--config", help="YAML file with sections backbone, saliency, objects, embed, cluster, ...")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), help="shorthand for device=...")
    parser.add_argument("--workers", type=int, help="DataLoader worker processes (shorthand for workers=N)")
    parser.add_argument("--seed", type=int, help="shorthand for seed=N")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad image instead of skipping it")
    parser.add_argument("--hash-content", action="store_true", help="fingerprint images by content, not path/size/mtime")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. cluster.k=30")
    parser.set_defaults(takes_overrides=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_pipeline.py", description=__doc__.split("`")[0].strip())
    commands = parser.add_subparsers(dest="command", required=True)
    _common(commands.add_parser("run", help="run every stage, taking unchanged ones from the cache"))
    stage = commands.add_parser("stage", help="(re)run one stage and what depends on it; upstream comes from the cache")
    stage.add_argument("name", help="saliency | objects | embed | cluster | pseudo_masks | train")
    stage.add_argument("--only", action="store_true", help="stop after this stage")
    _common(stage)
    status = commands.add_parser("status", help="each stage: cached / stale / missing, key, size, time")
    status.add_argument("--workdir", default=DEFAULT_WORKDIR)
    export = commands.add_parser("export", help="write the pseudo-label dataset: VOC-style folder or COCO JSON")
    export.add_argument("--workdir", default=DEFAULT_WORKDIR)
    export.add_argument("--to", required=True, help="a new (or empty) folder")
    export.add_argument("--format", default="voc", choices=("voc", "coco"),
                        help="voc: images/, masks/ (palette PNG, 255 ignore), train.txt, val.txt; coco: images/, "
                             "annotations.json (RLE per object) [voc]")
    export.add_argument("--clusters", help="export only these cluster ids, e.g. 3,7 (the rest become ignore / are dropped)")
    export.add_argument("--names", help="names.yaml mapping cluster id -> name, e.g. `3: person`")
    report = commands.add_parser("report", help="static HTML report: run summary, cluster galleries, overlays, plots")
    report.add_argument("--workdir", default=DEFAULT_WORKDIR)
    report.add_argument("--labels", help="ground-truth label PNGs: adds matched classes, purity, confusion and IoU plots")
    report.add_argument("--names", help="names.yaml mapping cluster id -> name, shown in the legend and galleries")
    report.add_argument("--out", help="report folder: new, empty, or an earlier report (only its own files are "
                                      "replaced) [WORKDIR/report]")
    report.add_argument("--clusters", help="show only these cluster ids, e.g. 3,7 (as with export --clusters)")
    report.add_argument("--classes", type=int, default=21, help="ground-truth classes of --labels, background included [21]")
    evaluate = commands.add_parser("evaluate", help="Hungarian-matched mIoU against ground-truth label PNGs")
    evaluate.add_argument("--workdir", default=DEFAULT_WORKDIR)
    evaluate.add_argument("--labels", required=True, help="folder of label PNGs named like the images")
    evaluate.add_argument("--source", default="pseudo_masks", choices=("pseudo_masks", "segmenter"),
                          help="the pseudo masks, or the trained segmenter's predictions on the same images")
    evaluate.add_argument("--classes", type=int, default=21,
                          help="ground-truth classes, background included; a label outside them is an error [21, VOC]")
    predict = commands.add_parser("predict", help="segment a new folder with a trained checkpoint (masks + overlays)")
    predict.add_argument("--checkpoint", required=True, help="a segmenter checkpoint, e.g. WD/cache/train/<key>/best.pt")
    predict.add_argument("--images", required=True)
    predict.add_argument("--out", required=True)
    predict.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    predict.add_argument("--workers", type=int, default=0)
    predict.add_argument("--strict", action="store_true")
    demo = commands.add_parser("demo", help="make a sample image set and run the whole pipeline on it, offline")
    demo.add_argument("--workdir", default="runs/demo")
    demo.add_argument("--images", type=int, default=48, help="how many sample images to generate")
    return parser


def _config(args):
    from pipeline.config import load_config

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
    if workdir is None or not (args.command in CREATES_WORKDIR or Path(workdir).is_dir()):
        return _command(args)
    from pipeline.runlog import logged

    return logged(Path(workdir), args.command, list(sys.argv[1:] if argv is None else argv), lambda: _command(args))


def _command(args) -> int:
    try:
        from pipeline import runner

        if args.command == "run":
            runner.run(_config(args), args.images, args.workdir)
        elif args.command == "stage":
            runner.run(_config(args), args.images, args.workdir, start=args.name, only=args.only)
        elif args.command == "status":
            for row in runner.status(args.workdir):
                size = f"{row['bytes'] / 1e6:9.1f} MB" if row["bytes"] is not None else " " * 12
                when = f"{row['seconds']:8.1f}s  {row['finished']}" if row["seconds"] is not None else ""
                print(f"{row['stage']:<13} {row['status']:<8} {row['key'][:12]}  {size}  {when}")
        elif args.command == "export":
            from stages.export import export_workdir

            meta = export_workdir(args.workdir, args.to, args.format, _chosen_clusters(args), args.names)
            print(f"exported {meta['images']} images ({meta['split']['train']} train, {meta['split']['val']} val), "
                  f"clusters {','.join(map(str, meta['clusters']))}, as {args.format} to {args.to}")
        elif args.command == "report":
            from stages.report import report_workdir

            index = report_workdir(args.workdir, args.out, args.labels, args.names, _chosen_clusters(args), args.classes)
            print(f"report written: {index}")
        elif args.command == "evaluate":
            from stages.evaluate import evaluate_workdir

            print(json.dumps(evaluate_workdir(args.workdir, args.labels, args.source, args.classes), indent=1))
        elif args.command == "predict":
            from stages.predict import predict_folder

            summary = predict_folder(args.checkpoint, args.images, args.out, runner.resolve_device(args.device),
                                     args.workers, args.strict)
            print(f"predicted {summary['computed']} images ({summary['images']} in all) into {args.out}")
        elif args.command == "demo":
            from pipeline.demo import run_demo

            run_demo(Path(args.workdir), args.images)
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
