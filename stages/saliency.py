"""Saliency: one foreground mask per image, the objects the rest of the method works on.

`spectral` finds foreground without any label: the backbone's patch features form an affinity
graph, whose normalized cut (the Fiedler vector of the generalized eigenproblem (D - W) y = λ D y,
as in TokenCut and Deep Spectral Methods) splits the image in two; the side touching fewer border
patches is foreground (TokenCut picks the side of the largest eigenvector entry instead; the
border rule found more of VOC's objects with our stand-in backbone, see the README).
`self_trained` needs no label either (after FOUND and SelfMask): the folder's own spectral masks
(two cuts, on the grid's features and on those joined by the next stage's, averaged) train a light
head (one 1x1 convolution = logistic regression on each patch's features of both levels) on the
frozen backbone, whose predictions replace them; what is consistent across the folder survives,
each photo's cut errors are outvoted. Both label-free masks are made at patch resolution, then moved
to the photo's colour edges by `refine` (pipeline/refine.py). `onnx` runs any salient-object model
exported to ONNX; `folder` reads the user's own masks (e.g. DeepUSPS outputs); both are at image
resolution and used as they are. Output: an 8-bit 0/255 PNG per image, at image size.
A photo need not hold an object: a uniform one (pixel standard deviation <= `UNIFORM_STD` grey levels) gets an
empty mask whatever the method, since any cut of it splits noise (a blank photo got 23% foreground).
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Callable, Literal

import cv2
import numpy as np
import scipy.linalg
import torch

from pipeline.artifacts import atomic_write, stable_hash
from pipeline.backbones import PATCH_LEVELS, build_backbone, resolve_weights, weights_key
from pipeline.digests import file_digest
from pipeline.context import Context, item_key, write_items
from pipeline.refine import RefineParams, refine_scores
from pipeline.errors import ConfigError, InputError
from pipeline.images import DEFAULT_MAX_PIXELS, decoded, files_named_like
from pipeline.outputs import mask_file
from pipeline.precision import device_in_key

VERSION = 2  # 2: uniform photos have no foreground
SPECTRAL_GRID = 28  # patches per side when input_size is 0
UNIFORM_STD = 4.0  # a photo whose pixel values spread less than this (grey levels) has nothing salient


@dataclasses.dataclass(frozen=True)
class HeadParams:
    """self_trained: the head learnt from the folder's spectral masks (FOUND: one 1x1 convolution, 500 steps)."""
    iterations: int = 500  # Adam steps per round
    batch: int = 8192  # patches per step, drawn from every training photo
    lr: float = 0.01
    rounds: int = 4  # round r > 1 learns from round r - 1's refined predictions (each round gained, less each time)
    max_images: int = 2000  # photos it learns from (evenly spread over the folder): bounds its memory
    levels: int = 2  # feature levels the head reads (Backbone.patch_features): 2 adds the next stage's map
    seed_levels: tuple[int, ...] = (1, 2)  # round 1's target: the mean of the spectral masks cut at these levels

    def __post_init__(self):
        if min(self.iterations, self.batch, self.rounds, self.max_images) < 1:
            raise ConfigError(f"head.iterations, batch, rounds and max_images must be >= 1, got {self}")
        if not self.seed_levels or any(level not in PATCH_LEVELS for level in (self.levels, *self.seed_levels)):
            raise ConfigError(f"head.levels and head.seed_levels must be among {PATCH_LEVELS}, got {self}")
        if self.lr <= 0:
            raise ConfigError(f"head.lr must be > 0, got {self.lr}")


@dataclasses.dataclass(frozen=True)
class Params:
    method: Literal["spectral", "self_trained", "onnx", "folder"] = "self_trained"  # the best label-free one (README)
    model: str = ""  # onnx: path to the model file
    masks_dir: str = ""  # folder: masks named like the images (same relative path or same stem), any image format
    input_size: int = 0  # square side the image is resized to; 0 = the ONNX model's own, or 28 patches for spectral
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # onnx: input = (rgb / 255 - mean) / std (ISNet's values)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    threshold: float = 0.5  # onnx: foreground where the model's output > threshold; folder: where mask > threshold * 255
    precision: Literal["int8", "float32"] = "int8"  # onnx on the CPU: int8 = static quantisation (2.7x faster on ISNet)
    calibration: int = 8  # onnx int8: photos of the folder whose activation ranges set the quantisation
    tau: float = 0.3  # spectral: patches with cosine affinity > tau are linked (TokenCut uses 0.2 on DINO keys)
    levels: int = 1  # spectral: feature levels the graph is built on (Backbone.patch_features)
    refine: RefineParams = RefineParams("global")  # spectral, self_trained: borders moved to the photo's colour edges
    head: HeadParams = HeadParams()  # self_trained

    def __post_init__(self):
        if self.input_size < 0:
            raise ConfigError(f"input_size must be >= 0, got {self.input_size}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must be in [0, 1], got {self.threshold}")
        if not -1.0 < self.tau < 1.0:
            raise ConfigError(f"tau must be in (-1, 1) (a cosine affinity), got {self.tau}")
        if self.calibration < 1:
            raise ConfigError(f"calibration must be >= 1 photo, got {self.calibration}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std must be positive, got {self.std}")
        if self.levels not in PATCH_LEVELS:
            raise ConfigError(f"levels must be among {PATCH_LEVELS}, got {self.levels}")


@dataclasses.dataclass(frozen=True)
class Method:
    """One way to find the foreground, said once: what of the config its masks depend on, what it checks
    before any work, how it makes the masks."""
    key_params: Callable[..., dict]  # (cfg) -> the method's part of the key
    check: Callable[..., object]  # (ctx, params): fails when an input is missing
    made: Callable[..., tuple[list[dict], dict]]  # (ctx, params) -> (items of ctx's share, counts), making what is missing


def key_params(cfg) -> dict:
    # max_pixels decides which images are skipped; named only when set, so existing caches stay valid
    return {**METHODS[cfg.saliency.method].key_params(cfg),
            **({"max_pixels": cfg.max_pixels} if cfg.max_pixels != DEFAULT_MAX_PIXELS else {})}


def check(ctx: Context, params: Params) -> None:
    """Fail before any work when the method's inputs are missing."""
    METHODS[params.method].check(ctx, params)


def run(ctx: Context, params: Params) -> dict:
    items, counts = METHODS[params.method].made(ctx, params)
    ctx.uses += [mask_file(ctx.store, i["key"]) for i in items]
    if "head" in counts:
        ctx.uses.append(_head_file(ctx.store, counts["head"]))
    if "int8_model" in counts:
        ctx.uses.append(_int8_file(ctx.store, counts["int8_model"]))
    write_items(ctx.out, items)
    return {"images": len(items), **counts}


def make(ctx: Context, params: Params) -> dict:
    """Store the masks of the images in `ctx.share` that have none yet; what was computed, counted."""
    return METHODS[params.method].made(ctx, params)[1]


def _each_image(ctx: Context, predictor, masks: dict[str, Path] | None = None) -> tuple[list[dict], dict]:
    """The masks of the methods that make each image's mask alone (from the photo, or a user's mask file)."""
    masks = masks or {}
    key_params_ = key_params(ctx.cfg)
    key_of = {r.rel: item_key("saliency", VERSION, key_params_, _parent(r, masks)) for r in ctx.images
              if ctx.in_share(r.rel)}
    items, computed = _masks_of(ctx, key_of, predictor)
    return items, {"computed": computed}


def _spectral_params(cfg) -> dict:
    p = cfg.saliency
    # options at their old values stay out of the key, so the masks made before them stay valid
    refine = {"refine": dataclasses.asdict(p.refine)} if p.refine.method != "none" else {}
    levels = {"levels": p.levels} if p.levels != 1 else {}
    return {"method": "spectral", "input_size": p.input_size, "tau": p.tau, "backbone": weights_key(cfg.backbone),
            "fiedler": "symmetric", **refine, **levels, **device_in_key(cfg.device)}  # the solver's rounding


def _self_trained_params(cfg) -> dict:
    p = cfg.saliency
    return {**_spectral_params(cfg), "method": p.method, "head": dataclasses.asdict(p.head), "seed": cfg.seed}


def _onnx_params(cfg) -> dict:
    p = cfg.saliency
    # on a GPU the model runs as it is (ISNet: float16); on the CPU widened to float32, or quantised to int8
    precision = device_in_key(cfg.device) or ({"cpu_float16_as": "float32"} if p.precision == "float32"
                                              else {"precision": "int8", "calibration": p.calibration})
    return {"method": p.method, "model_sha256": file_digest(p.model) if Path(p.model).is_file() else "",
            **precision, "input_size": p.input_size, "mean": p.mean, "std": p.std, "threshold": p.threshold}


def _folder_params(cfg) -> dict:
    p = cfg.saliency
    return {"method": p.method, "masks_dir": str(Path(p.masks_dir).resolve()), "threshold": p.threshold}


def _check_backbone(ctx: Context, params: Params) -> None:
    resolve_weights(ctx.cfg.backbone)


def _check_onnx(ctx: Context, params: Params) -> None:
    if not params.model:
        raise ConfigError("saliency.method=onnx needs saliency.model=/path/to/model.onnx")
    if not Path(params.model).is_file():
        raise InputError(f"saliency.model={params.model}: no such file")
    import onnxruntime
    _onnx_providers(onnxruntime, ctx.device)


def _made_folder(ctx: Context, params: Params) -> tuple[list[dict], dict]:
    masks = _masks_for(ctx, params)

    def read(record, rgb: np.ndarray) -> np.ndarray:
        return _read_user_mask(masks[record.rel], rgb.shape[:2], params.threshold)

    return _each_image(ctx, lambda: read, masks)


def _masks_of(ctx: Context, key_of: dict[str, str], predictor, report_bad: bool = True) -> tuple[list[dict], int]:
    """Each image's mask under `key_of[image]`, made by `predictor()(record, rgb)` where it is not stored yet:
    (items of the images that decode, in input order; how many masks were made)."""
    pending = [r for r in ctx.images if r.rel in key_of and not mask_file(ctx.store, key_of[r.rel]).is_file()]
    if pending:  # built only when there is work: rank 0's final pass over stored masks needs no model
        predict = predictor()
    loader = decoded([r.path for r in pending], workers=ctx.cfg.workers)
    bad = set()
    for index, rgb, reason in ctx.progress(loader, "saliency", total=len(pending)):
        record = pending[index]
        if rgb is None:
            if report_bad:
                ctx.skip(record.rel, reason)
            bad.add(record.rel)
            continue
        mask = np.zeros(rgb.shape[:2], np.uint8) if is_uniform(rgb) else predict(record, rgb)
        ok, png = cv2.imencode(".png", mask)
        atomic_write(mask_file(ctx.store, key_of[record.rel]), lambda tmp: tmp.write_bytes(png.tobytes()))
    # Images that failed in an earlier run are decoded again above, so `bad` is complete.
    items = [{"image": r.rel, "key": key_of[r.rel]} for r in ctx.images if r.rel in key_of and r.rel not in bad]
    return items, len(pending) - len(bad)


def is_uniform(rgb: np.ndarray) -> bool:
    """True for a photo with nothing in it to segment: every channel's standard deviation is at most
    UNIFORM_STD grey levels (JPEG noise on a flat grey spreads its range to 14 levels, not its spread)."""
    return bool(rgb.reshape(-1, rgb.shape[-1]).std(axis=0).max() <= UNIFORM_STD)


def _parent(record, masks: dict[str, Path]) -> str:
    if record.rel not in masks:
        return record.fingerprint
    stat = masks[record.rel].stat()  # a user's mask that changes makes the image's result stale
    return f"{record.fingerprint}|{masks[record.rel]}:{stat.st_size}:{stat.st_mtime_ns}"


def refined_mask(rgb: np.ndarray, foreground: np.ndarray, refine: RefineParams) -> np.ndarray:
    """0/255 mask where the coarse foreground probability (or indicator), upsampled to the photo and
    smoothed along its colours, is above one half. The smoothers are linear and keep constants, so
    smoothing the background's 1 - p gives 1 minus the smoothed p: one channel decides."""
    height, width = rgb.shape[:2]
    upsampled = cv2.resize(foreground.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    smoothed = refine_scores(rgb, upsampled[..., None], refine)[..., 0]
    return np.where(smoothed > 0.5, 255, 0).astype(np.uint8)


# --- spectral: normalized cut on patch affinities -----------------------------------------------

class _Spectral:
    """Patch features of a photo at the spectral grid, and the normalized cut of their affinities."""

    def __init__(self, ctx: Context, params: Params):
        self.backbone = build_backbone(ctx.cfg.backbone).to(ctx.device)
        self.params, self.device = params, ctx.device
        self.kept: dict[str, tuple] = {}  # self_trained: photo -> its head patches and grid, kept from the training set

    @torch.inference_mode()
    def features(self, rgb: np.ndarray, levels: int = 1) -> torch.Tensor:
        """(C, h, w) float32 patch features on the CPU, of the photo resized to the spectral input side."""
        height, width = rgb.shape[:2]
        stride = self.backbone.patch_stride
        side = max(stride, (self.params.input_size or SPECTRAL_GRID * stride) // stride * stride)
        resized = cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA if side < min(height, width) else cv2.INTER_LINEAR)
        tensor = torch.from_numpy(resized).permute(2, 0, 1)[None].to(self.device)
        return self.backbone.patch_features(tensor, levels)[0].float().cpu()

    def mask(self, levels: int, record, rgb: np.ndarray) -> np.ndarray:
        features = self.features(rgb, levels)
        score = fiedler_foreground(features.flatten(1).T.numpy().astype(np.float64), tuple(features.shape[1:]), self.params.tau)
        return refined_mask(rgb, score > 0, self.params.refine)

    def __call__(self, record, rgb: np.ndarray) -> np.ndarray:
        return self.mask(self.params.levels, record, rgb)

    def head_patches(self, record, rgb: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """((h * w, C) float16 features the saliency head reads, (h, w)): those the head's training set kept
        when this run made it, else computed. float16 either way, so a photo's mask is the same whether its
        head was trained in this run or read from the store."""
        if record.rel in self.kept:
            return self.kept[record.rel]
        features = self.features(rgb, self.params.head.levels)
        return features.flatten(1).T.to(torch.float16), tuple(features.shape[1:])


def fiedler_foreground(features: np.ndarray, grid: tuple[int, int], tau: float) -> np.ndarray:
    """(h, w) signed score per patch (> 0 = foreground) from the normalized cut of the patch affinity graph."""
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    affinity = unit @ unit.T
    weights = np.where(affinity > tau, 1.0, 1e-5)  # TokenCut's graph: linked patches weigh 1, others almost 0
    # (D - W) y = λ D y as the symmetric D^-1/2 W D^-1/2 v = (1 - λ) v, y = D^-1/2 v: its second largest
    # eigenvector by LAPACK's dense solver, 2.4x faster than the generalized form with the same vector.
    # ARPACK (scipy.sparse.linalg.eigsh) was as fast but, where the second eigenvalue is repeated, returned
    # a different vector on each call (benchmarks/spectral_saliency.py)
    scale = 1.0 / np.sqrt(weights.sum(axis=1))
    normalized = scale[:, None] * weights * scale[None, :]
    n = len(normalized)
    _, vectors = scipy.linalg.eigh(normalized, subset_by_index=[n - 2, n - 2])
    fiedler = vectors[:, 0] * scale
    split = (fiedler - fiedler.mean()).reshape(grid)
    border = np.concatenate([split[0], split[-1], split[1:-1, 0], split[1:-1, -1]])
    return split if (border > 0).mean() < 0.5 else -split


# --- self_trained: a head learnt from the folder's own spectral masks --------------------------------

HEAD_CHECKPOINT_EVERY = 50  # Adam steps between the resumable states of a head's training


def _made_self_trained(ctx: Context, params: Params) -> tuple[list[dict], dict]:
    """Spectral masks cut at each of `head.seed_levels` (cached as method=spectral with that `levels` caches
    them) train the head on their mean: two cuts that disagree teach "unsure" where either alone would teach
    its own errors. Its refined predictions are the masks. The head is an artifact of its own, keyed by the
    seeds it learnt from: it learns from every image's seeds, so under torchrun rank 0 trains it once all
    ranks stored theirs."""
    spectral = functools.cache(lambda: _Spectral(ctx, params))
    seed_of, seeds_computed = {}, 0
    for level in params.head.seed_levels:
        as_spectral = dataclasses.replace(ctx.cfg, saliency=dataclasses.replace(params, method="spectral", levels=level))
        seed_params = key_params(as_spectral)  # the very keys method=spectral stores its masks under
        key_of = {r.rel: item_key("saliency", VERSION, seed_params, r.fingerprint) for r in ctx.images}
        cut = lambda level=level: functools.partial(spectral().mask, level)  # noqa: E731 (built only when needed)
        seeds_computed += _masks_of(ctx, {rel: key for rel, key in key_of.items() if ctx.in_share(rel)}, cut)[1]
        for rel, key in key_of.items():
            seed_of.setdefault(rel, []).append(key)

    def learnt():  # once every rank stored its seeds; an image with none did not decode
        seeds = [{"image": rel, "keys": keys} for rel, keys in seed_of.items()
                 if all(mask_file(ctx.store, key).is_file() for key in keys)]
        return seeds, *_trained_head(ctx, params, spectral(), seeds)

    seeds, head, head_file = ctx.rank_zero_first(learnt)
    head_key = head_file.stem.removeprefix("head-")
    kept = {i["image"] for i in seeds}
    predict_params = {**key_params(ctx.cfg), "head_key": head_key}
    key_of = {r.rel: item_key("saliency", VERSION, predict_params, r.fingerprint) for r in ctx.images
              if r.rel in kept and ctx.in_share(r.rel)}
    items, computed = _masks_of(ctx, key_of, lambda: functools.partial(_head_mask, head, spectral()), report_bad=False)
    return items, {"computed": computed, "spectral_computed": seeds_computed, "head": head_key}


def _head_file(store, head_key: str) -> Path:
    return store.items("saliency") / f"head-{head_key}.pt"


class SaliencyHead(torch.nn.Module):
    """Foreground logit per patch: a 1x1 convolution (here a Linear on each patch's features) on features
    standardised with the training patches' mean and spread (kept with the weights, so any photo is
    scaled alike)."""

    def __init__(self, channels: int):
        super().__init__()
        self.linear = torch.nn.Linear(channels, 1)
        torch.nn.init.zeros_(self.linear.weight)  # logistic regression is convex: no random start needed
        torch.nn.init.zeros_(self.linear.bias)
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # (N, C) -> (N,) logits
        return self.linear((patches - self.mean) / self.std)[:, 0]

    def probability(self, patches: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
        """(h, w) foreground probability from a photo's (h * w, C) patch features."""
        with torch.inference_mode():
            return torch.sigmoid(self(patches.float())).reshape(grid).numpy()


def _head_mask(head: SaliencyHead, spectral: _Spectral, record, rgb: np.ndarray) -> np.ndarray:
    return refined_mask(rgb, head.probability(*spectral.head_patches(record, rgb)), spectral.params.refine)


def _trained_head(ctx: Context, params: Params, spectral: _Spectral, seeds: list[dict]) -> tuple[SaliencyHead, Path]:
    """The last round's head and its file: each round is stored, keyed by what it learnt from (not by how
    many rounds follow it, so more rounds train only the new ones), and taken from the store when there; a
    round interrupted resumes from its last saved state."""
    if not seeds:
        raise InputError("saliency.method=self_trained found no decodable photo to learn from")
    chosen = seeds[::-(-len(seeds) // params.head.max_images)]
    learnt_with = _self_trained_params(ctx.cfg)
    learnt_with["head"] = {name: value for name, value in learnt_with["head"].items() if name != "rounds"}
    head, key = None, stable_hash({"seeds": [i["keys"] for i in chosen], "params": learnt_with})
    for round_ in range(params.head.rounds):
        key = stable_hash({"after": key, "round": round_})
        path = _head_file(ctx.store, key)
        if not path.is_file():
            patches, targets = _training_set(ctx, chosen, head, spectral)
            trained = _train_head(patches, targets, params.head, ctx.cfg.seed, path.with_suffix(".resume"))
            atomic_write(path, lambda tmp: torch.save(trained.state_dict(), tmp))
            path.with_suffix(".resume").unlink(missing_ok=True)
        state = torch.load(path, map_location="cpu", weights_only=True)
        head = SaliencyHead(state["mean"].shape[0])
        head.load_state_dict(state)
    return head, path


def _training_set(ctx: Context, chosen: list[dict], head: SaliencyHead | None, spectral: _Spectral):
    """(patches (N, C) float16, targets (N,)): every patch of the chosen photos with its foreground share
    (0..1) in the photo's mask: the mean of its spectral seeds' in round 1, the previous head's refined
    prediction's after. The photos' patches stay in `spectral.kept` (views of the one tensor), for the next
    round and the predictions, which then need no second pass of the backbone."""
    records = {r.rel: r for r in ctx.images}
    photos, grids, patches, targets = [], [], [], []
    loader = decoded([records[i["image"]].path for i in chosen], workers=ctx.cfg.workers)
    for index, rgb, reason in ctx.progress(loader, "saliency head", total=len(chosen)):
        if rgb is None:  # the photo changed since its seed was made; it is left out of the training
            continue
        record = records[chosen[index]["image"]]
        features, grid = spectral.head_patches(record, rgb)
        if head is None:
            masks = [cv2.imread(str(mask_file(ctx.store, key)), cv2.IMREAD_GRAYSCALE) for key in chosen[index]["keys"]]
        else:
            masks = [refined_mask(rgb, head.probability(features, grid), spectral.params.refine)]
        share = np.mean([patch_shares(m, grid) for m in masks], axis=0)
        photos.append(record.rel)
        grids.append(grid)
        patches.append(features)
        targets.append(torch.from_numpy(share.reshape(-1)))
    joined = torch.cat(patches)
    spectral.kept = dict(zip(photos, zip(joined.split([len(p) for p in patches]), grids)))
    return joined, torch.cat(targets)


def patch_shares(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(h, w) share of each patch's pixels that `mask` (image size, > 0 = foreground) covers."""
    return cv2.resize((mask > 0).astype(np.float32), (grid[1], grid[0]), interpolation=cv2.INTER_AREA)


def _train_head(patches: torch.Tensor, targets: torch.Tensor, params: HeadParams, seed: int, resume: Path) -> SaliencyHead:
    """Adam on the binary cross-entropy of random batches of patches. Saved every HEAD_CHECKPOINT_EVERY
    steps with Adam's and the batch sampler's states, so a run interrupted and resumed makes the same bytes.
    One thread: the steps are too small to share (two threads were 25x slower on a busy 2-core machine),
    and the sums then do not depend on the machine's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _adam_steps(patches, targets, params, seed, resume)
    finally:
        torch.set_num_threads(threads)


def _adam_steps(patches: torch.Tensor, targets: torch.Tensor, params: HeadParams, seed: int, resume: Path) -> SaliencyHead:
    head = SaliencyHead(patches.shape[1])
    head.mean.copy_(patches.float().mean(dim=0))
    head.std.copy_(patches.float().std(dim=0).clamp_min(1e-6))
    optimizer = torch.optim.Adam(head.linear.parameters(), lr=params.lr)
    sampler = torch.Generator().manual_seed(seed)
    step = 0
    if resume.is_file():
        state = torch.load(resume, map_location="cpu", weights_only=True)
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.set_state(state["sampler"])
        step = state["step"]
    while step < params.iterations:
        batch = torch.randint(len(patches), (params.batch,), generator=sampler)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(patches[batch].float()), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % HEAD_CHECKPOINT_EVERY == 0 and step < params.iterations:
            state = {"head": head.state_dict(), "optimizer": optimizer.state_dict(), "sampler": sampler.get_state(),
                     "step": step}
            atomic_write(resume, lambda tmp: torch.save(state, tmp))
    return head


# --- onnx: a salient-object model ------------------------------------------------------------------

class _OnnxSaliency:
    """The model's foreground mask of a photo: on the CPU float32 (a float16 model widened), or the int8 model
    stored at `quantized`; on a GPU as shipped."""

    def __init__(self, params: Params, device: torch.device, quantized: Path | None = None):
        import onnx
        import onnxruntime

        self.params = params
        model = onnx.load(params.model) if device.type == "cuda" else onnx.load_from_string(float32_model(params.model))
        model_input = model.graph.input[0]
        self.input_name = model_input.name
        fixed = [d.dim_value for d in model_input.type.tensor_type.shape.dim[2:] if d.dim_value]
        self.side = params.input_size or (fixed[0] if fixed else 0)
        if not self.side:
            raise ConfigError(f"{params.model} has a dynamic input size: set saliency.input_size")
        if fixed and self.side != fixed[0]:
            model = at_input_size(model, fixed[0], self.side, params.model)
        self.graph = model.SerializeToString()  # what int8 quantisation starts from
        self.session = onnxruntime.InferenceSession(quantized.read_bytes() if quantized else self.graph,
                                                    providers=_onnx_providers(onnxruntime, device))
        self.output_name = self.session.get_outputs()[0].name

    def input(self, rgb: np.ndarray) -> np.ndarray:
        """(1, 3, side, side) float32: the photo resized to the model's side, normalised."""
        height, width = rgb.shape[:2]
        x = cv2.resize(rgb, (self.side, self.side), interpolation=cv2.INTER_AREA if self.side < min(height, width)
                       else cv2.INTER_LINEAR).astype(np.float32) / 255.0
        x = (x - np.array(self.params.mean, np.float32)) / np.array(self.params.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None])

    def __call__(self, record, rgb: np.ndarray) -> np.ndarray:
        height, width = rgb.shape[:2]
        (out,) = self.session.run([self.output_name], {self.input_name: self.input(rgb)})
        prob = cv2.resize(out.reshape(out.shape[-2:]).astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        return np.where(prob > self.params.threshold, 255, 0).astype(np.uint8)


def _made_onnx(ctx: Context, params: Params) -> tuple[list[dict], dict]:
    """Each photo's mask from the model. In int8 (the CPU default) every mask also depends on the photos that
    calibrated the quantisation: `calibration` photos of the folder, those whose fingerprints hash lowest, so
    that a photo added to a large folder rarely changes them. Rank 0 quantises once under torchrun."""
    if params.precision == "float32" or device_in_key(ctx.cfg.device):
        return _each_image(ctx, lambda: _OnnxSaliency(params, ctx.device))
    import onnxruntime

    photos = calibration_photos(ctx.images, params.calibration)
    model_key = stable_hash({"model": key_params(ctx.cfg), "calibration": sorted(r.fingerprint for r in photos),
                             "ranges": "mean",  # 865c113's int8 models took the extreme (min, max): not reused
                             "onnxruntime": onnxruntime.__version__})  # its quantiser decides which operators to quantise
    path = _int8_file(ctx.store, model_key)

    def quantized() -> None:
        if not path.is_file():
            float32 = _OnnxSaliency(params, ctx.device)
            loader = decoded([r.path for r in photos], workers=ctx.cfg.workers)
            inputs = [float32.input(rgb) for _, rgb, _ in ctx.progress(loader, "saliency int8 calibration", len(photos))
                      if rgb is not None]
            if not inputs:
                raise InputError("saliency.precision=int8 found no decodable photo to calibrate on")
            quantize_int8(float32, inputs, path)

    ctx.rank_zero_first(quantized)
    predict_params = {**key_params(ctx.cfg), "int8_model": model_key}
    key_of = {r.rel: item_key("saliency", VERSION, predict_params, r.fingerprint) for r in ctx.images if ctx.in_share(r.rel)}
    items, computed = _masks_of(ctx, key_of, lambda: _OnnxSaliency(params, ctx.device, path))
    return items, {"computed": computed, "int8_model": model_key}


def calibration_photos(images: list, count: int) -> list:
    """The `count` photos whose fingerprints hash lowest: a photo added to the folder joins them only with
    probability count / (photos + 1), and the listing's order does not matter."""
    return sorted(images, key=lambda r: stable_hash(r.fingerprint))[:count]


def _int8_file(store, model_key: str) -> Path:
    return store.items("saliency") / f"int8-{model_key}.onnx"


def quantize_int8(float32: _OnnxSaliency, inputs: list[np.ndarray], path: Path, ranges: str = "mean") -> None:
    """ONNX Runtime's static quantisation of the float32 graph, stored at `path`: weights int8 per output channel,
    activations uint8, as QuantizeLinear/DequantizeLinear pairs that its CPU kernels fuse into int8 convolutions.
    Each activation's range is the mean over `inputs` of its per-photo (min, max); `ranges="extreme"` (ONNX
    Runtime's default, kept for benchmarks/onnx_input_size.py) takes the extreme over them, which lets one photo's
    outliers coarsen every photo's steps (README, "ONNX saliency"). Dynamic quantisation, which needs no
    calibration, was 4.3x slower than float32 on ISNet."""
    if ranges not in ("mean", "extreme"):
        raise ValueError(f"ranges must be mean or extreme, got {ranges!r}")
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Inputs(CalibrationDataReader):
        def __init__(self):
            self.rest = iter(inputs)

        def get_next(self):
            x = next(self.rest, None)
            return None if x is None else {float32.input_name: x}

    with tempfile.TemporaryDirectory(prefix="objseg-int8-") as folder:
        source, prepared = Path(folder) / "float32.onnx", Path(folder) / "prepared.onnx"
        source.write_bytes(float32.graph)
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)  # shapes inferred, graph fused first
        atomic_write(path, lambda tmp: quantize_static(
            str(prepared), str(tmp), Inputs(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            extra_options={"CalibMovingAverage": ranges == "mean"}))


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


def _onnx_providers(onnxruntime, device: torch.device) -> list:
    """CUDA exactly when `device` asks for it, never just because it exists: on this process's GPU (under
    torchrun, its LOCAL_RANK's), with the CPU for the operators CUDA lacks."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise ConfigError("device=cuda, but this onnxruntime has no CUDAExecutionProvider: "
                          "install the GPU build (pip install -e \".[gpu]\", see the README) or use device=cpu")
    gpu = device.index if device.index is not None else torch.cuda.current_device()
    return [("CUDAExecutionProvider", {"device_id": gpu}), "CPUExecutionProvider"]


# --- folder: the user's masks ----------------------------------------------------------------------

def _masks_for(ctx: Context, params: Params) -> dict[str, Path]:
    """Map each image to its mask file (see `files_named_like`)."""
    if not params.masks_dir:
        raise ConfigError("saliency.method=folder needs saliency.masks_dir=/path/to/masks")
    root = Path(params.masks_dir)
    if not root.is_dir():
        raise InputError(f"saliency.masks_dir={root}: no such folder")
    found = files_named_like(root, [r.rel for r in ctx.images])
    missing = [r.rel for r in ctx.images if r.rel not in found]
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


METHODS = {
    "spectral": Method(_spectral_params, _check_backbone,
                       lambda ctx, params: _each_image(ctx, lambda: _Spectral(ctx, params))),
    "self_trained": Method(_self_trained_params, _check_backbone, _made_self_trained),
    "onnx": Method(_onnx_params, _check_onnx, _made_onnx),
    "folder": Method(_folder_params, _masks_for, _made_folder),
}
