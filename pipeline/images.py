"""Image listing, fingerprints and robust decoding to RGB.

Every stage decodes through `load_rgb`, so an image looks the same everywhere:
EXIF orientation applied; gray, palette, RGBA, 16-bit and CMYK converted to 8-bit RGB.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline.artifacts import file_sha256
from pipeline.errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb limit
MAX_PIXELS = DEFAULT_MAX_PIXELS  # larger images are skipped; the config's max_pixels sets it


class BadImage(Exception):
    """An image that cannot be decoded; the message is the one-line reason."""


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    path: Path  # absolute
    rel: str  # relative to the input folder, with forward slashes: the image's name everywhere
    fingerprint: str

    @property
    def stem(self) -> str:
        return stem_of(self.rel)


def stem_of(rel: str) -> str:
    """Relative path without suffix: names an image's masks and labels."""
    return rel.rsplit(".", 1)[0]


def files_named_like(root: Path, images: list[str]) -> dict[str, Path]:
    """Each image's file in `root` (the user's masks, ground-truth labels), in any image format: the one at
    the image's relative path, else one with its file stem; of files with one name a `.png` comes first,
    then path order. Images without a file are left out."""
    by_rel, by_stem = {}, {}
    for path in sorted(root.rglob("*"), key=lambda p: (p.suffix.lower() != ".png", p.relative_to(root).as_posix())):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            by_rel.setdefault(path.relative_to(root).with_suffix("").as_posix(), path)
            by_stem.setdefault(path.stem, path)
    found = {}
    for rel in images:
        path = by_rel.get(stem_of(rel)) or by_stem.get(Path(rel).stem)
        if path is not None:
            found[rel] = path
    return found


def list_images(folder: str | Path, hash_content: bool = False) -> list[ImageRecord]:
    """All images under `folder` (recursively), sorted by relative path."""
    return scan_images(folder, hash_content)[0]


def scan_images(folder: str | Path, hash_content: bool = False) -> tuple[list[ImageRecord], list[dict]]:
    """(images, left out): every image under `folder`, sorted by relative path, and every other file
    found, each with its one-line reason. Symlinks are followed (datasets are often symlink farms), a
    folder reached a second time (a symlink loop) is not entered again."""
    root = Path(folder)
    if not root.exists():
        raise InputError(f"image folder not found: {root}")
    if not root.is_dir():
        raise InputError(f"not a folder: {root}")
    root = root.resolve()
    records, left_out, seen = [], [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        if os.path.realpath(here) in seen:
            left_out.append({"image": here.relative_to(root).as_posix(), "reason": "symlink to a folder already listed (a loop)"})
            dirnames.clear()
            continue
        seen.add(os.path.realpath(here))
        dirnames.sort()
        for name in filenames:
            path = here / name
            rel = path.relative_to(root).as_posix()
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                left_out.append({"image": rel, "reason": f"not an image file name ({path.suffix or 'no suffix'})"})
            elif not path.exists():
                left_out.append({"image": rel, "reason": "broken symlink"})
            elif not path.is_file():
                left_out.append({"image": rel, "reason": "not a regular file"})
            else:
                records.append(ImageRecord(path, rel, fingerprint(path, rel, hash_content)))
    records.sort(key=lambda r: r.rel)
    kept, by_stem = [], {}
    for record in records:  # masks are named by the stem: a.jpg and a.png would overwrite each other's
        if record.stem in by_stem:
            left_out.append({"image": record.rel, "reason": f"same name as {by_stem[record.stem]} apart from the extension"})
        else:
            by_stem[record.stem] = record.rel
            kept.append(record)
    if not kept:
        raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {root}")
    return kept, sorted(left_out, key=lambda e: e["image"])


def is_image_problem(left_out: dict) -> bool:
    """An image file that cannot be used (strict mode stops on it), not just a file that is no image."""
    return not left_out["reason"].startswith("not an image file name")


def fingerprint(path: Path, rel: str, hash_content: bool) -> str:
    if hash_content:
        return f"{rel}:sha256:{file_sha256(path)}"  # really hashed: that is what the flag asks for
    stat = path.stat()
    return f"{rel}:{stat.st_size}:{stat.st_mtime_ns}"


def dataset_fingerprint(records: list[ImageRecord]) -> str:
    """Of the images used, only: files the scan left out change nothing that is computed."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(record.fingerprint.encode() + b"\n")
    return digest.hexdigest()


def set_pixel_limit(pixels: int) -> None:
    """Images above this many pixels are skipped (decompression bombs). Global like Pillow's own limit,
    and set before DataLoader workers fork, so they inherit it."""
    global MAX_PIXELS
    MAX_PIXELS = pixels


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 RGB array; raise BadImage with a one-line reason."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise BadImage(f"{image.width}x{image.height} exceeds the {MAX_PIXELS}-pixel limit")
                image.load()
                image = ImageOps.exif_transpose(image)
                return _to_rgb(image)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"cannot decode: {exc}") from None


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite onto white so transparent pixels do not become arbitrary hidden colours.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy


class DecodedImages(torch.utils.data.Dataset):
    """Decodes images in DataLoader workers, then applies `transform(index, rgb)`; a bad image yields its reason."""

    def __init__(self, paths: list[Path], transform=None):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            rgb = load_rgb(self.paths[index])
        except BadImage as exc:
            return index, None, str(exc)
        return index, (self.transform(index, rgb) if self.transform else rgb), None


def _keep(sample):
    return sample


def decoded(paths: list[Path], transform=None, workers: int = 0) -> torch.utils.data.DataLoader:
    """Iterate (index, transformed image or None, reason or None) in order, decoding in `workers` processes."""
    return torch.utils.data.DataLoader(DecodedImages(paths, transform), batch_size=None, shuffle=False,
                                       num_workers=workers, collate_fn=_keep, prefetch_factor=4 if workers else None)


def label_palette() -> list[int]:
    """PASCAL VOC's colour map (bit-interleaved ids), so ids look the same as in VOC tools; 255 is white."""
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.extend((r, g, b))
    palette[255 * 3:] = [255, 255, 255]
    return palette


_PALETTE = label_palette()


def write_label_png(path: Path, labels: np.ndarray) -> None:
    """An 8-bit palette PNG of class ids (what VOC-style loaders read as-is)."""
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(_PALETTE)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False)


def read_label_png(path: Path) -> np.ndarray:
    """Class ids of a label PNG (palette or 8-bit gray); raises InputError naming the file."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise InputError(f"{path}: a label image must be 8-bit palette or gray, got mode {image.mode}")
            return np.asarray(image, dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: cannot read label image: {exc}") from None
