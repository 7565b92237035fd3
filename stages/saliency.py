"""Saliency: one foreground mask per image, the objects the rest of the method works on.

`spectral` finds foreground without any label: the backbone's patch features form an affinity
graph, whose normalized cut (the Fiedler vector of the generalized eigenproblem (D - W) y = λ D y,
as in TokenCut and Deep Spectral Methods) splits the image in two; the side touching fewer border
patches is foreground (TokenCut picks the side of the largest eigenvector entry instead; the
border rule found more of VOC's objects with our stand-in backbone, see the README). `onnx` runs any salient-object model exported to ONNX; `folder`
reads the user's own masks (e.g. DeepUSPS outputs). Output: an 8-bit 0/255 PNG per image, at image size.
A photo need not hold an object: a uniform one (pixel standard deviation <= `UNIFORM_STD` grey levels) gets an
empty mask whatever the method, since any cut of it splits noise (a blank photo got 23% foreground).
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import scipy.linalg
import torch

from pipeline.artifacts import atomic_write
from pipeline.backbones import build_backbone, weights_key
from pipeline.digests import file_digest
from pipeline.context import Context, item_key, write_items
from pipeline.errors import ConfigError, InputError
from pipeline.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, decoded

VERSION = 2  # 2: uniform photos have no foreground
SPECTRAL_GRID = 28  # patches per side when input_size is 0
UNIFORM_STD = 4.0  # a photo whose pixel values spread less than this (grey levels) has nothing salient


@dataclasses.dataclass(frozen=True)
class Params:
    method: Literal["spectral", "onnx", "folder"] = "spectral"
    model: str = ""  # onnx: path to the model file
    masks_dir: str = ""  # folder: masks named like the images (same relative path or same stem), any image format
    input_size: int = 0  # square side the image is resized to; 0 = the ONNX model's own, or 28 patches for spectral
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # onnx: input = (rgb / 255 - mean) / std (ISNet's values)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    threshold: float = 0.5  # onnx: foreground where the model's output > threshold; folder: where mask > threshold * 255
    tau: float = 0.3  # spectral: patches with cosine affinity > tau are linked (TokenCut uses 0.2 on DINO keys)

    def __post_init__(self):
        if self.input_size < 0:
            raise ConfigError(f"input_size must be >= 0, got {self.input_size}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must be in [0, 1], got {self.threshold}")
        if not -1.0 < self.tau < 1.0:
            raise ConfigError(f"tau must be in (-1, 1) (a cosine affinity), got {self.tau}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std must be positive, got {self.std}")


def key_params(cfg) -> dict:
    # max_pixels decides which images are skipped; named only when set, so existing caches stay valid
    return {**_method_params(cfg), **({"max_pixels": cfg.max_pixels} if cfg.max_pixels != DEFAULT_MAX_PIXELS else {})}


def _method_params(cfg) -> dict:
    p = cfg.saliency
    if p.method == "spectral":
        return {"method": p.method, "input_size": p.input_size, "tau": p.tau, "backbone": weights_key(cfg.backbone)}
    if p.method == "onnx":
        return {"method": p.method, "model_sha256": file_digest(p.model) if Path(p.model).is_file() else "", "cpu_float16_as": "float32", "input_size": p.input_size,
                "mean": p.mean, "std": p.std, "threshold": p.threshold}
    return {"method": p.method, "masks_dir": str(Path(p.masks_dir).resolve()), "threshold": p.threshold}


def check(ctx: Context, params: Params) -> None:
    """Fail before any work when the method's inputs are missing."""
    if params.method == "spectral":
        from pipeline.backbones import resolve_weights
        resolve_weights(ctx.cfg.backbone)
    elif params.method == "onnx":
        if not params.model:
            raise ConfigError("saliency.method=onnx needs saliency.model=/path/to/model.onnx")
        if not Path(params.model).is_file():
            raise InputError(f"saliency.model={params.model}: no such file")
    else:
        _masks_for(ctx, params)


def run(ctx: Context, params: Params) -> dict:
    masks = _masks_for(ctx, params) if params.method == "folder" else {}
    key_params_ = key_params(ctx.cfg)
    key_of = {r.rel: item_key("saliency", VERSION, key_params_, _parent(r, masks)) for r in ctx.images}
    pending = [r for r in ctx.images if not mask_file(ctx.store, key_of[r.rel]).is_file()]
    predict = _predictor(ctx, params, masks)
    loader = decoded([r.path for r in pending], workers=ctx.cfg.workers)
    bad = set()
    for index, rgb, reason in ctx.progress(loader, "saliency", total=len(pending)):
        record = pending[index]
        if rgb is None:
            ctx.skip(record.rel, reason)
            bad.add(record.rel)
            continue
        mask = np.zeros(rgb.shape[:2], np.uint8) if is_uniform(rgb) else predict(record, rgb)
        ok, png = cv2.imencode(".png", mask)
        atomic_write(mask_file(ctx.store, key_of[record.rel]), lambda tmp: tmp.write_bytes(png.tobytes()))
    items = [{"image": r.rel, "key": key_of[r.rel]} for r in ctx.images if r.rel not in bad]
    ctx.uses += [mask_file(ctx.store, i["key"]) for i in items]
    # Images that failed in an earlier run are decoded again above, so `bad` is complete.
    write_items(ctx.out, items)
    return {"images": len(items), "computed": len(pending) - len(bad)}


def is_uniform(rgb: np.ndarray) -> bool:
    """True for a photo with nothing in it to segment: every channel's standard deviation is at most
    UNIFORM_STD grey levels (JPEG noise on a flat grey spreads its range to 14 levels, not its spread)."""
    return bool(rgb.reshape(-1, rgb.shape[-1]).std(axis=0).max() <= UNIFORM_STD)


def mask_file(store, key: str) -> Path:
    """Where the mask of the saliency item `key` is stored."""
    return store.items("saliency") / f"{key}.png"


def _parent(record, masks: dict[str, Path]) -> str:
    if record.rel not in masks:
        return record.fingerprint
    stat = masks[record.rel].stat()  # a user's mask that changes makes the image's result stale
    return f"{record.fingerprint}|{masks[record.rel]}:{stat.st_size}:{stat.st_mtime_ns}"


def _predictor(ctx: Context, params: Params, masks: dict[str, Path]):
    if params.method == "spectral":
        return functools.partial(_spectral_mask, build_backbone(ctx.cfg.backbone).to(ctx.device), params, ctx.device)
    if params.method == "onnx":
        return _OnnxSaliency(params, ctx.device)
    return lambda record, rgb: _read_user_mask(masks[record.rel], rgb.shape[:2], params.threshold)


# --- spectral: normalized cut on patch affinities -----------------------------------------------

@torch.inference_mode()
def _spectral_mask(backbone, params: Params, device, record, rgb: np.ndarray) -> np.ndarray:
    height, width = rgb.shape[:2]
    stride = backbone.patch_stride
    side = max(stride, (params.input_size or SPECTRAL_GRID * stride) // stride * stride)
    resized = cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA if side < min(height, width) else cv2.INTER_LINEAR)
    tensor = torch.from_numpy(resized).permute(2, 0, 1)[None].to(device)
    features = backbone.patch_features(tensor)[0].float()  # (C, h, w)
    grid_h, grid_w = features.shape[1:]
    score = fiedler_foreground(features.flatten(1).T.cpu().numpy().astype(np.float64), (grid_h, grid_w), params.tau)
    soft = cv2.resize(score.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return np.where(soft > 0, 255, 0).astype(np.uint8)


def fiedler_foreground(features: np.ndarray, grid: tuple[int, int], tau: float) -> np.ndarray:
    """(h, w) signed score per patch (> 0 = foreground) from the normalized cut of the patch affinity graph."""
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    affinity = unit @ unit.T
    weights = np.where(affinity > tau, 1.0, 1e-5)  # TokenCut's graph: linked patches weigh 1, others almost 0
    degree = np.diag(weights.sum(axis=1))
    _, vectors = scipy.linalg.eigh(degree - weights, degree, subset_by_index=[1, 1])
    fiedler = vectors[:, 0]
    split = (fiedler - fiedler.mean()).reshape(grid)
    border = np.concatenate([split[0], split[-1], split[1:-1, 0], split[1:-1, -1]])
    return split if (border > 0).mean() < 0.5 else -split


# --- onnx: a salient-object model ------------------------------------------------------------------

class _OnnxSaliency:
    def __init__(self, params: Params, device: torch.device):
        import onnx
        import onnxruntime

        self.params = params
        providers = _onnx_providers(onnxruntime, device)
        model = onnx.load(params.model) if "CUDAExecutionProvider" in providers else \
            onnx.load_from_string(float32_model(params.model))
        model_input = model.graph.input[0]
        self.input_name = model_input.name
        fixed = [d.dim_value for d in model_input.type.tensor_type.shape.dim[2:] if d.dim_value]
        self.side = params.input_size or (fixed[0] if fixed else 0)
        if not self.side:
            raise ConfigError(f"{params.model} has a dynamic input size: set saliency.input_size")
        if fixed and self.side != fixed[0]:
            model = at_input_size(model, fixed[0], self.side, params.model)
        self.session = onnxruntime.InferenceSession(model.SerializeToString(), providers=providers)
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, record, rgb: np.ndarray) -> np.ndarray:
        height, width = rgb.shape[:2]
        x = cv2.resize(rgb, (self.side, self.side), interpolation=cv2.INTER_AREA if self.side < min(height, width)
                       else cv2.INTER_LINEAR).astype(np.float32) / 255.0
        x = (x - np.array(self.params.mean, np.float32)) / np.array(self.params.std, np.float32)
        (out,) = self.session.run([self.output_name], {self.input_name: x.transpose(2, 0, 1)[None]})
        prob = cv2.resize(out.reshape(out.shape[-2:]).astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        return np.where(prob > self.params.threshold, 255, 0).astype(np.uint8)


def at_input_size(model, native: int, side: int, name: str):
    """A fully convolutional model exported at a fixed `native` square input, made to run at `side`.
    Tracing bakes every upsampling target into the graph as a constant size (ISNet: Resize to
    Concat(batch and channels of the input, [32, 32])), so those constants are scaled by side / native
    and the input and output dimensions freed. A size that would not be a whole number is refused."""
    from onnx import numpy_helper

    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type != "Resize" or len(node.input) < 4 or node.input[3] not in producers:
            continue
        sizes = producers[node.input[3]]
        for part in (producers.get(i) for i in sizes.input) if sizes.op_type == "Concat" else ():
            if part is not None and part.op_type == "Constant":
                value = numpy_helper.to_array(part.attribute[0].t)
                scaled = value * side // native
                if (scaled * native != value * side).any():
                    raise ConfigError(f"saliency.input_size={side}: {name} upsamples to {value.tolist()} at its "
                                      f"{native}x{native} input, which does not scale to whole pixels at {side}; "
                                      f"try a multiple of {native // int(np.gcd.reduce(value.astype(int)))}")
                part.attribute[0].t.CopyFrom(numpy_helper.from_array(scaled.astype(value.dtype)))
    for value in (*model.graph.input, *model.graph.output):
        for dim in value.type.tensor_type.shape.dim[2:]:
            dim.dim_param = "side"
    del model.graph.value_info[:]  # shapes inferred at `native` no longer hold
    return model


def float32_model(path: str) -> bytes:
    """The model with float16 weights, constants and casts made float32. ONNX Runtime's CPU kernels are
    float32, so a float16 model spends its time casting there (ISNet: ~2x slower)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    def widen(tensor) -> None:
        if tensor.data_type == TensorProto.FLOAT16:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))

    model = onnx.load(path)
    for tensor in model.graph.initializer:
        widen(tensor)
    for node in model.graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT16:
                attribute.i = TensorProto.FLOAT
            elif attribute.type == onnx.AttributeProto.TENSOR:
                widen(attribute.t)
    for value in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    return model.SerializeToString()


def _onnx_providers(onnxruntime, device: torch.device) -> list[str]:
    """CUDA only when `device` asks for it (and the onnxruntime build has it), never just because it exists."""
    available = onnxruntime.get_available_providers()
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider") if device.type == "cuda" else ("CPUExecutionProvider",)
    return [p for p in wanted if p in available]


# --- folder: the user's masks ----------------------------------------------------------------------

def _masks_for(ctx: Context, params: Params) -> dict[str, Path]:
    """Map each image to its mask file: same relative path, or same file stem, with any image suffix."""
    if not params.masks_dir:
        raise ConfigError("saliency.method=folder needs saliency.masks_dir=/path/to/masks")
    root = Path(params.masks_dir)
    if not root.is_dir():
        raise InputError(f"saliency.masks_dir={root}: no such folder")
    by_rel, by_stem = {}, {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            stem = path.relative_to(root).with_suffix("").as_posix()
            by_rel.setdefault(stem, path)
            by_stem.setdefault(path.stem, path)
    found, missing = {}, []
    for record in ctx.images:
        path = by_rel.get(record.stem) or by_stem.get(Path(record.rel).stem)
        if path is None:
            missing.append(record.rel)
        else:
            found[record.rel] = path
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise InputError(f"saliency.masks_dir={root} has no mask for {len(missing)} of {len(ctx.images)} images: {shown}")
    return found


def _read_user_mask(path: Path, shape: tuple[int, int], threshold: float) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
    if mask is None:
        raise InputError(f"{path}: cannot read this mask")
    if mask.shape != shape:
        mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return np.where(mask > threshold * 255, 255, 0).astype(np.uint8)

