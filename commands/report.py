"""Report: a static HTML view of a finished run, to look at what went together (no server, no script, no CDN).

  index.html          clusters (legend with names, sizes, matched class and purity with --labels, a preview of
                      each), cluster-size histogram, confusion and per-class IoU after Hungarian matching
                      (--labels), metrics of earlier `evaluate` runs, training curves, sample images
                      (photo | saliency | pseudo mask | segmenter | ground truth), and the run itself: config,
                      artifact keys, counts, timings per stage, skipped files with their reasons
  clusters/<id>.html  the crops nearest the cluster's centroid and a random sample of the others
  crops/ overlays/ plots/   JPEG crops and photos, PNG masks and plots, all linked relatively
  report.json         the numbers shown, for scripts
Crops are cut again from the photos with the objects stage's boxes, so nothing new is cached. Work is
capped (SAMPLE_IMAGES photos, NEAREST + RANDOM crops per cluster) so a report takes seconds, not minutes.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from commands import report_html
from commands.evaluate import SOURCES, VOC_CLASSES, class_names, entry_confusion, label_files, scores
from pipeline import plots
from pipeline.artifacts import MANIFEST, read_json, temp_dir_beside, write_json
from pipeline.errors import CacheCorruptError, InputError
from pipeline.images import BadImage, load_rgb, read_label_png, write_label_png
from pipeline.names import check_clusters, classes_of, cluster_name, load_names
from pipeline.outputs import (IGNORE, TRAIN_LOG, cluster_sizes, embedding_rows, load_clusters, load_objects, mask_file,
                              object_file, read_items)
from pipeline.runner import STAGE_NAMES, Workdir

SAMPLE_IMAGES = 24  # photos shown with their masks
NEAREST = 12  # crops nearest the centroid, per cluster
RANDOM = 12  # crops drawn from the rest of the cluster
CROP_SIDE = 128  # longest side of a crop, in pixels
PANEL_SIDE = 240  # longest side of a sample image's panels
REPORT_JSON = "report.json"  # its "files" list every file of the report: only those are ever replaced


@dataclasses.dataclass(frozen=True)
class Crop:
    row: int  # embedding row = object index of the cluster stage
    image: str
    distance: float
    core: bool
    file: str | None  # relative to the report; None when the photo cannot be read any more


def report_workdir(workdir: Path, out: Path | None = None, labels: Path | None = None, names: Path | None = None,
                   clusters: list[int] | None = None, num_classes: int = VOC_CLASSES) -> Path:
    """Write the report of the last run in `workdir` to `out` (default `workdir/report`); returns its index.html.
    With `clusters`, only those clusters are shown (as with `export --clusters`)."""
    started = time.perf_counter()
    wd = Workdir(Path(workdir))
    state = wd.last_run("pseudo_masks")
    out = Path(out) if out else wd.root / "report"
    earlier = _earlier_report_files(out)
    entries = {stage: wd.latest_entry(stage, state) for stage in ("saliency", "embed", "cluster", "pseudo_masks")}
    if "train" in state["keys"]:
        entries["train"] = wd.latest_entry("train", state)
    manifests = {stage: read_json(wd.store.entry(stage, key) / MANIFEST) for stage, key in state["keys"].items()
                 if wd.store.lookup(stage, key)}
    sizes = cluster_sizes(entries["cluster"])
    k = len(sizes)
    cluster_names = load_names(names, k) if names else {}
    classes = classes_of(k, cluster_names)
    selection = check_clusters(clusters, k) if clusters is not None else None
    shown = selection or list(range(k))
    pseudo_items = read_items(entries["pseudo_masks"])
    label_paths = label_files(Path(labels), [i["image"] for i in pseudo_items]) if labels else {}
    label_names = class_names(Path(labels), num_classes) if labels else []

    try:
        tmp = temp_dir_beside(out)
    except OSError as exc:
        raise InputError(f"cannot write the report next to {out}: {exc.strerror}; choose another --out") from None
    for folder in ("crops", "overlays", "plots", "clusters"):
        (tmp / folder).mkdir(parents=True)
    try:
        clusters = _clusters(wd, entries, state, shown, cluster_names, classes.of_cluster, tmp)
        against_labels = _against_labels(entries["pseudo_masks"], pseudo_items, label_paths, clusters, tmp,
                                         label_names) if labels else None
        overlays = _overlays(wd, entries, pseudo_items, label_paths, state, classes.value_map(), tmp)
        train_log = _train_log(entries.get("train"), tmp)
        plots.cluster_sizes(tmp / "plots" / "cluster_sizes.png", [c["core"] for c in clusters],
                            [c["objects"] - c["core"] for c in clusters], [c["name"] for c in clusters])
        data = {"workdir": str(wd.root.resolve()), "images_folder": state["images"], "images": len(pseudo_items),
                "objects": sum(sizes), "k": k,
                "names": {str(c): n for c, n in sorted(cluster_names.items())}, "classes": list(classes.names),
                "clusters": clusters, "selection": selection,
                "labels": str(labels) if labels else None, "against_labels": against_labels,
                "evaluations": _evaluations(wd, state), "overlays": overlays, "training": train_log is not None,
                "stages": _stages(state, manifests, STAGE_NAMES), "skipped": _skipped(state, manifests), "config": state["config"],
                "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        for index, cluster in enumerate(clusters):
            (tmp / "clusters" / f"{cluster['id']}.html").write_text(report_html.cluster_page(data, index))
        (tmp / "index.html").write_text(report_html.index_page(data))
        data["seconds"] = round(time.perf_counter() - started, 2)
        data["files"] = sorted([p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()] + [REPORT_JSON])
        write_json(tmp / REPORT_JSON, data)
        _replace(tmp, out, earlier)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "index.html"


def _earlier_report_files(out: Path) -> list[str]:
    """The files of an earlier report at `out` (to be replaced); [] for a new or empty folder. Anything else
    there, or any file the earlier report did not list as its own, is refused: a report never deletes a
    file it did not write."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder; choose another --out")
    present = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir())
    if not present:
        return []
    try:
        own = set(read_json(out / REPORT_JSON).get("files", [])) if (out / REPORT_JSON).is_file() else set()
    except (CacheCorruptError, AttributeError):
        own = set()
    foreign = [p for p in present if p not in own]
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise InputError(f"{out} holds files that are not an earlier report of this tool's ({', '.join(foreign[:3])}{more}); "
                         f"choose another --out")
    return present


def _replace(tmp: Path, out: Path, earlier: list[str]) -> None:
    """Move the finished report into place. An earlier one there is moved aside, then its own files alone are
    deleted, and the folders they leave empty."""
    if out.is_dir() and not earlier:
        out.rmdir()  # empty, checked by _earlier_report_files
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old / out.name, out)  # the earlier report stays where it was
        raise
    for name in earlier:
        (old / out.name / name).unlink(missing_ok=True)
    for folder in sorted((p for p in old.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        folder.rmdir()  # raises if anything unexpected appeared meanwhile: then it stays
    old.rmdir()


def _clusters(wd, entries: dict, state: dict, shown: list[int], names: dict[int, str], class_of: tuple[int, ...],
              tmp: Path) -> list[dict]:
    """Each cluster's size, class (the value its pixels get in the report's masks and the export) and crops:
    the NEAREST to its centroid and RANDOM of the others, written as JPEGs."""
    found = load_clusters(entries["cluster"])
    assignment, distance, core = found.assignment, found.distance, found.core
    rng = np.random.default_rng(state["config"]["seed"])
    chosen = {}
    for cluster_id in shown:
        members = np.flatnonzero(assignment == cluster_id)
        by_distance = members[np.argsort(distance[members], kind="stable")]
        rest = by_distance[NEAREST:]
        sample = rest[np.sort(rng.choice(len(rest), min(RANDOM, len(rest)), replace=False))]
        chosen[cluster_id] = (by_distance[:NEAREST], sample)
    embed_items = read_items(entries["embed"])
    image_index, object_id = embedding_rows(entries["embed"])
    wanted = sorted(int(r) for nearest, sample in chosen.values() for r in (*nearest, *sample))
    files = _write_crops(wd, embed_items, image_index, object_id, wanted, Path(state["images"]), tmp)

    def crops(rows) -> list[dict]:
        return [dataclasses.asdict(Crop(int(r), embed_items[image_index[r]]["image"], round(float(distance[r]), 4),
                                        bool(core[r]), files.get(int(r)))) for r in rows]

    clusters = []
    for cluster_id, (nearest, sample) in chosen.items():
        members = assignment == cluster_id
        clusters.append({"id": cluster_id, "value": cluster_id + 1, "class_value": class_of[cluster_id],
                         "name": cluster_name(cluster_id, names),
                         "named": cluster_id in names, "objects": int(members.sum()), "core": int((members & core).sum()),
                         "nearest": crops(nearest), "random": crops(sample)})
    return clusters


def _write_crops(wd, embed_items, image_index, object_id, rows: list[int], images_root: Path, tmp: Path) -> dict[int, str]:
    """{row: crop file} for the rows whose photo can still be read; each photo is decoded once."""
    by_image = defaultdict(list)
    for row in rows:
        by_image[int(image_index[row])].append(row)
    files = {}
    for position, image_rows in tqdm(by_image.items(), desc="report crops", disable=None, leave=False, unit="img"):
        item = embed_items[position]
        try:
            rgb = load_rgb(images_root / item["image"])
        except BadImage:  # changed or removed since the run: the report shows the crop as missing
            continue
        boxes = load_objects(object_file(wd.store, item["objects_key"]))[1]
        for row in image_rows:
            x0, y0, x1, y1 = boxes[object_id[row] - 1]
            crop = Image.fromarray(rgb[y0:y1, x0:x1])
            scale = CROP_SIDE / max(crop.size)  # small objects are enlarged too, so a gallery reads at one size
            crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.Resampling.LANCZOS)
            files[row] = f"crops/{row}.jpg"
            crop.save(tmp / files[row], format="JPEG", quality=85)
    return files


def _against_labels(entry: Path, items: list[dict], label_paths: dict[str, Path], clusters: list[dict], tmp: Path,
                    label_names: list[str]) -> dict:
    """Hungarian-matched scores of the pseudo masks; each cluster gets its matched class, majority class and
    purity (the share of its labelled pixels in its majority class); confusion and IoU plots, the label
    classes by their names."""
    confusion, num_predicted, num_classes = entry_confusion(entry, items, label_paths, len(label_names))
    result = scores(confusion, num_predicted, num_classes)
    assignment = {int(row): cls for row, cls in result["assignment"].items()}
    for cluster in clusters:
        counts = confusion[cluster["value"], :num_classes]
        majority = int(np.argmax(counts))
        cluster.update(matched_class=assignment.get(cluster["value"]), majority_class=majority if counts.sum() else None,
                       purity=round(float(counts[majority] / counts.sum()), 4) if counts.sum() else None)
    value_names = {0: "background", **{c["value"]: c["name"] for c in clusters}}
    matched_first = sorted(range(num_predicted), key=lambda v: (v not in assignment, assignment.get(v, 0), v))
    matrix = np.concatenate([confusion[matched_first, :num_classes], confusion[IGNORE:, :num_classes]]).T
    plots.confusion(tmp / "plots" / "confusion.png", matrix, label_names,
                    [value_names[v] for v in matched_first] + ["ignore"])
    matched_name = {cls: value_names[row] for row, cls in assignment.items()}
    iou = {int(c): v for c, v in result["hungarian"]["per_class_iou"].items()}
    plots.class_iou(tmp / "plots" / "class_iou.png", iou,
                    {c: f"{label_names[c]} = {matched_name[c]}" if c in matched_name else label_names[c] for c in iou})
    return {"images": sum(i["image"] in label_paths for i in items), "classes": num_classes, **result,
            "class_names": label_names}


def _overlays(wd, entries: dict, items: list[dict], label_paths: dict[str, Path], state: dict,
              class_of_value: np.ndarray, tmp: Path) -> list[dict]:
    """Up to SAMPLE_IMAGES photos spread over the run, each with its masks as panels of the same size; the
    pseudo masks and the segmenter's in the classes the cluster names make (as the export writes them)."""
    saliency = {i["image"]: mask_file(wd.store, i["key"]) for i in read_items(entries["saliency"])}
    segmenter = ({i["image"]: entries["train"] / i["mask"] for i in read_items(entries["train"])}
                 if "train" in entries else {})
    picked = np.unique(np.linspace(0, len(items) - 1, min(SAMPLE_IMAGES, len(items))).round().astype(int))
    rows = []
    for number, position in enumerate(tqdm(picked, desc="report overlays", disable=None, leave=False, unit="img")):
        item = items[position]
        try:
            rgb = load_rgb(Path(state["images"]) / item["image"])
        except BadImage:
            continue
        height, width = rgb.shape[:2]
        scale = min(1.0, PANEL_SIDE / max(height, width))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        row = {"image": item["image"], "width": size[0], "height": size[1],
               "photo": f"overlays/{number}-photo.jpg"}
        Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS).save(tmp / row["photo"], format="JPEG", quality=85)
        row["saliency"] = _mask_panel(_read_gray(saliency.get(item["image"])), size, tmp, f"overlays/{number}-saliency.png", gray=True)
        row["pseudo_mask"] = _mask_panel(class_of_value[read_label_png(entries["pseudo_masks"] / item["mask"])], size,
                                         tmp, f"overlays/{number}-pseudo.png")
        if segmenter:
            path = segmenter.get(item["image"])
            row["segmenter"] = _mask_panel(class_of_value[read_label_png(path)] if path else None, size, tmp,
                                           f"overlays/{number}-segmenter.png")
        if label_paths:
            path = label_paths.get(item["image"])
            row["ground_truth"] = _mask_panel(read_label_png(path) if path else None, size, tmp, f"overlays/{number}-truth.png")
        rows.append(row)
    return rows


def _read_gray(path: Path | None) -> np.ndarray | None:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) if path else None


def _mask_panel(mask: np.ndarray | None, size: tuple[int, int], tmp: Path, name: str, gray: bool = False) -> str | None:
    """A mask resized (nearest) to the panel size: palette PNG of ids, or gray PNG for saliency; None if absent."""
    if mask is None:
        return None
    small = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    if gray:
        Image.fromarray(small).save(tmp / name, format="PNG")  # 2-D uint8: 8-bit gray
    else:
        write_label_png(tmp / name, small)
    return name


def _train_log(entry: Path | None, tmp: Path) -> list[dict] | None:
    """The segmenter's train_log.csv rows, plotted; None when the run has not trained."""
    if entry is None or not (entry / TRAIN_LOG).is_file():
        return None
    with open(entry / TRAIN_LOG, newline="") as f:
        log = list(csv.DictReader(f))
    if log:
        plots.training_curves(tmp / "plots" / "training.png", log)
    return log or None


def _evaluations(wd, state: dict) -> list[dict]:
    """Metrics that `evaluate` wrote (one per source and label folder), each marked with whether it is of
    this run's entry and with the labels and image count it used."""
    found = []
    for source, stage in SOURCES.items():
        for path in sorted((wd.root / "evaluation" / source).glob("*/metrics.json")):
            metrics = read_json(path)
            found.append({"source": source, "current": metrics.get("entry") == state["keys"].get(stage),
                          "miou": metrics.get("miou"), "pixel_accuracy": metrics.get("hungarian", {}).get("pixel_accuracy"),
                          "majority_miou": metrics.get("majority", {}).get("miou"),
                          "saliency_iou": metrics.get("saliency_foreground", {}).get("iou"),
                          "images": metrics.get("images_evaluated"), "without_label": metrics.get("images_without_label"),
                          "labels": metrics.get("labels"), "file": str(path)})
    return found


def _stages(state: dict, manifests: dict, order: tuple[str, ...]) -> list[dict]:
    rows = []
    for stage in (s for s in order if s in state["keys"]):
        key, manifest = state["keys"][stage], manifests.get(stage, {})
        rows.append({"stage": stage, "key": key, "seconds": manifest.get("seconds"), "finished": manifest.get("finished"),
                     "counts": {k: v for k, v in manifest.get("counts", {}).items() if not isinstance(v, (list, dict))},
                     "skipped": len(manifest.get("skipped", []))})
    return rows


def _skipped(state: dict, manifests: dict) -> list[dict]:
    """Files the folder scan left out (in no cache key, so kept with the run), then images the stages skipped."""
    return [*({"stage": "scan", **skip} for skip in state.get("left_out", [])),
            *({"stage": stage, **skip} for stage, manifest in manifests.items() for skip in manifest.get("skipped", []))]
