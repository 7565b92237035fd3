"""Predict: segment a new folder with a trained checkpoint; writes label masks and overlays.

  OUT/masks/<id>.png      palette PNG of class ids (0 background, 1..k clusters)
  OUT/overlays/<id>.jpg   the image with its classes blended in
  OUT/predict.json        the checkpoint's hash, counts and skipped images
  OUT/saliency/           a workdir of the saliency stage, when the checkpoint votes over salient regions
Each mask is written atomically and finished ones are kept, so an interrupted predict resumes. Photos
are segmented as training segmented its own: the checkpoint's `inference` (scales, flips, refinement,
region votes); for region votes the saliency stage first masks the new photos with the training run's
saliency settings (recorded in the checkpoint).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline import distributed, runner
from pipeline.artifacts import atomic_write, file_sha256, read_json, write_json
from pipeline.errors import InputError
from pipeline.images import decoded, is_image_problem, label_palette, scan_images, write_label_png
from pipeline.outputs import mask_file, read_items, read_mask
from pipeline.runner import load_config_dict
from pipeline.segmenter import Inference, segmenter_from_checkpoint

PALETTE = np.array(label_palette(), dtype=np.uint8).reshape(256, 3)


def predict_folder(checkpoint: Path, images_dir: Path, out: Path, device, workers: int = 0, strict: bool = False,
                   inference: Inference | None = None) -> dict:
    """`inference` replaces the checkpoint's own (benchmarks measure test-time options with it). Under
    torchrun each rank segments every world-th photo; rank 0 checks the arguments and writes predict.json."""
    checkpoint, out = Path(checkpoint), Path(out)
    share = distributed.join(device)
    try:
        digest = distributed.from_rank_zero(lambda: _checked(checkpoint, out))
        model, payload = segmenter_from_checkpoint(checkpoint, device)
        inference = inference or Inference.from_dict(payload["inference"])
        # With region votes the saliency run meets the folder's bad files first and reports each; predict
        # then only records them.
        if inference.region_vote:
            foreground = saliency_masks(payload, images_dir, out / "saliency", device, strict)
        records, left_out = scan_images(images_dir)  # every rank lists the same folder alike
        if not inference.region_vote:
            distributed.from_rank_zero(lambda: _reported(left_out, strict))
        masks = [out / "masks" / f"{r.stem}.png" for r in records]
        pending = [i for i, path in enumerate(masks) if share.holds(i) and not path.is_file()]
        skipped = []
        loader = decoded([records[i].path for i in pending], workers=workers)
        for index, rgb, reason in tqdm(loader, desc="predict", total=len(pending), disable=None, leave=False):
            record = records[pending[index]]
            if rgb is None or (inference.region_vote and record.rel not in foreground):
                reason = reason or "the saliency stage made no mask of it"
                if strict:
                    raise InputError(f"{record.path}: {reason}")
                if not inference.region_vote:
                    tqdm.write(f"skipped {record.rel}: {reason}", file=sys.stderr)
                skipped.append({"image": record.rel, "reason": reason})
                continue
            mask = read_mask(foreground[record.rel]) if inference.region_vote else None
            labels, _ = model.predict(rgb, inference, foreground=mask)
            overlay = out / "overlays" / f"{record.stem}.jpg"
            overlay.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(blend(rgb, labels)).save(overlay, quality=90)
            atomic_write(masks[pending[index]], lambda tmp: write_label_png(tmp, labels))  # last: marks the image done
        shares = distributed.gathered_on_rank_zero({"computed": len(pending), "skipped": skipped})
        finished = {"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": digest, "finished": True,
                    "num_classes": payload["num_classes"], "left_out": left_out}
        summary = distributed.from_rank_zero(lambda: _summarised(finished, len(records), shares, out / "predict.json"))
        distributed.barrier()  # no rank leaves while another still receives the summary: gloo would abort it
        return summary
    finally:
        distributed.leave()


def saliency_masks(payload: dict, images_dir: Path, workdir: Path, device, strict: bool = False) -> dict[str, Path]:
    """The saliency mask of each photo of the folder (by its relative path), made in `workdir` by the saliency
    stage with the settings of the run that trained the checkpoint, as its pseudo masks' objects were made."""
    cfg = dataclasses.replace(load_config_dict(payload["run_config"]), device=device.type, strict=strict)
    wd = runner.Workdir(workdir)
    keys = runner.run(cfg, images_dir, workdir, start="saliency", only=True, log=lambda *args, **kwargs: None)
    return {item["image"]: mask_file(wd.store, item["key"]) for item in read_items(wd.store.entry("saliency", keys["saliency"]))}


def _checked(checkpoint: Path, out: Path) -> str:
    """The checkpoint's sha256, once it is known that `out` may take its predictions (marked unfinished)."""
    if not checkpoint.is_file():
        raise InputError(f"checkpoint not found: {checkpoint}")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder; choose another --out")
    digest = file_sha256(checkpoint)
    summary_file = out / "predict.json"
    if summary_file.is_file() and read_json(summary_file).get("checkpoint_sha256") != digest:
        raise InputError(f"{out} holds predictions of another checkpoint; choose another --out")
    write_json(summary_file, {"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": digest, "finished": False})
    return digest


def _reported(left_out: list[dict], strict: bool) -> None:
    """The files the listing left out, printed as `run` prints them (they are in predict.json too); in strict
    mode the first bad image stops."""
    for entry in left_out:
        if strict and is_image_problem(entry):
            raise InputError(f"{entry['image']}: {entry['reason']} (strict mode stops at the first bad image)")
        tqdm.write(f"skipped {entry['image']}: {entry['reason']}", file=sys.stderr)


def _summarised(finished: dict, listed: int, shares: list[dict], summary_file: Path) -> dict:
    """predict.json: `finished` with every rank's counts added in (`listed` photos in all)."""
    skipped = sorted((s for share in shares for s in share["skipped"]), key=lambda s: s["image"])
    computed = sum(share["computed"] for share in shares) - len(skipped)
    summary = {**finished, "images": listed - len(skipped), "computed": computed, "skipped": skipped}
    write_json(summary_file, summary)
    return summary


def blend(rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with each non-background class painted in its palette colour at `alpha`."""
    colours = PALETTE[labels].astype(np.float32)
    painted = labels[..., None] != 0
    return np.where(painted, (1 - alpha) * rgb + alpha * colours, rgb).astype(np.uint8)
