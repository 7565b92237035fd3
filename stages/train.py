"""Train: a DeepLabv3 segmenter learns from the pseudo masks, then from its own confident predictions.

The recipe, read top to bottom in `run`: round 1 learns the pseudo masks, optionally with an ignore
band along their borders, where they are least reliable; each later round trains a new network, from the
initial trunk weights as in COMUS's self-training, on the previous round's predictions over the training
images, keeping only pixels predicted with probability >= `confidence` (the rest are ignored). Every
round minimises CrossEntropy (ignore 255) weighted per cluster by its pixel frequency among object pixels
to the power -`balance` (background keeps weight 1), with Adam and DeepLab's poly learning-rate decay.

Two trunk modes (`trunk`; `auto`: frozen on the CPU, finetune on a GPU):
- finetune: the whole network trains on random rescales (0.5-2x base_size), crops and flips of the photos.
- frozen: the trunk's features of every photo are computed once, at each inference view (scales of the
  prediction size, each with its mirror image), and only the ASPP head trains, on random crops of them:
  an epoch of VOC-330 in about a minute on 2 shared cores, and a trunk that cannot overfit the noisy targets.
Predictions (each round's targets, and `predict` from the checkpoint, which records how) average the
softmax over the views, then optionally refine the scores along the photo's colour edges (pipeline.refine);
with `region_vote`, each salient region of the photo (its pseudo mask's objects here; in `predict`, the
saliency stage's mask of the new photo) then takes the object class its pixels find most probable: the
saliency model draws the shapes, the segmenter names them.

Checkpoints go to a work folder that survives a kill, so an interrupted `train` resumes at its last epoch.
Under `torchrun`, DDP with a DistributedSampler splits each global batch over the processes (gloo on CPU,
nccl and SyncBatchNorm on GPU); rank 0 alone writes. Augmentations are seeded per (seed, round, epoch,
sample), so the data a step sees does not depend on the number of processes or workers.
"""
from __future__ import annotations

import csv
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline import distributed, torchrun
from pipeline.artifacts import atomic_write
from pipeline.backbones import SPECS, IMAGENET_MEAN, IMAGENET_STD, BackboneName, BackboneParams, resolve_weights, weights_key
from pipeline.context import Context, write_items
from pipeline.errors import ConfigError, InputError
from pipeline.images import BadImage, load_rgb, read_label_png, stem_of, write_label_png
from pipeline.outputs import IGNORE, TRAIN_LOG, class_count, read_items
from pipeline.precision import autocast
from pipeline.refine import RefineParams
from pipeline.segmenter import Inference, Segmenter, load_checkpoint, save_checkpoint, set_rng_state

VERSION = 10  # 2: MobileNetV2 dilated to output stride 16; 3: 320-channel MobileNetV2 head, poly lr, class balance,
# warm rounds, flip TTA; 4: background keeps weight 1 in the class balance; 5: class balance in round 1 only;
# 6: every round starts from the initial trunk weights, not from the previous round's network;
# 7: predictions at the training crops' mean scale (predict_size), not at base_size;
# 8: every round balanced on its own targets; 9: a dataset smaller than the batch is repeated to fill it
# (a batch of one sample crashed BatchNorm), so every step sees batch_size samples;
# 10: trunk modes (frozen on the CPU by default), multi-scale views, refined predictions, confident-only
# self-training targets and a border ignore band: predictions average softmax scores, not logits; rounds=2,
# confidence 0.5 and guided refinement by default (held-out VOC: round 2 +1.7 points over round 1, 3 seeds).
# Later defaults change keys through their params, not VERSION: region votes and rounds=1 (README, "The segmenter")
TUNED_LR_SCALE = 0.1  # pretrained blocks move slower than the new head, as in fine-tuning recipes
MIN_BATCH = 2  # BatchNorm in training needs 2 samples per channel (the head's image-pooling branch is 1x1)
TrunkMode = Literal["auto", "frozen", "finetune"]
# What epochs, lr, crop_size and base_size left at 0 mean, per trunk mode (README: "The segmenter"). The frozen
# head stops at 6 epochs: under 5-fold cross-validation on VOC-330 it named held-out objects 1.0 point better
# than after 12 (3 seeds), the usual early stop against noisy targets, in half the time
RECIPES = {"finetune": {"epochs": 10, "lr": 6e-5, "crop_size": 512, "base_size": 520},
           "frozen": {"epochs": 6, "lr": 1e-3, "crop_size": 256, "base_size": 320}}


@dataclasses.dataclass(frozen=True)
class Params:
    backbone: BackboneName = "dino_resnet50"  # the trunk: self-supervised like the rest; ResNets are dilated to output stride 8
    weights: str = ""  # trunk weights: a file, "" = torch.hub's cache, "random" = untrained, by request only
    trunk: TrunkMode = "auto"  # frozen: only the head trains, on features computed once; auto: frozen on the CPU
    # 1 = learn the pseudo masks; each further round learns the previous round's confident predictions. With region
    # votes a second round named held-out objects worse on every seed (README), so one round is the default
    rounds: int = 1
    epochs: int = 0  # per round; 0 = the trunk mode's recipe (RECIPES)
    batch_size: int = 8  # global: split over the processes under torchrun; a smaller dataset is repeated to fill it
    lr: float = 0.0  # initial, decays as (1 - epoch / epochs) ** 0.9 (DeepLab's poly schedule); 0 = the recipe's
    balance: float = 0.5  # cluster weight = its pixel frequency ** -balance among the round's object pixels; 0 = plain CrossEntropy
    weight_decay: float = 0.0
    crop_size: int = 0  # training crops (pixels); 0 = the recipe's
    base_size: int = 0  # finetune rescales the short side to [0.5, 2] x base_size; predictions use predict_size; 0 = the recipe's
    scales: tuple[float, ...] = (1.0,)  # inference views, as multiples of predict_size, each with its mirror image
    refine: RefineParams = RefineParams("guided")  # predictions' scores refined along the photo's colour edges
    confidence: float = 0.5  # self-training targets ignore pixels predicted with a lower probability
    border: int = 0  # round 1 ignores pseudo-mask pixels within this many pixels of another label
    # frozen: the trunk's last blocks that train with the head, on the features cached before them
    tuned_blocks: int = 0
    # predictions paint each salient region (a connected component of the photo's saliency foreground: the
    # pseudo masks' objects when training, the saliency stage's masks in `predict`) with its pixels' most
    # probable object class; the segmenter's own prediction stays outside them
    region_vote: bool = True

    def __post_init__(self):
        for name in ("rounds", "epochs", "crop_size", "base_size", "border", "lr"):
            if getattr(self, name) < (1 if name == "rounds" else 0):
                raise ConfigError(f"{name} must be >= {1 if name == 'rounds' else 0}, got {getattr(self, name)}")
        if self.batch_size < MIN_BATCH:
            raise ConfigError(f"batch_size must be >= {MIN_BATCH} (BatchNorm needs {MIN_BATCH} samples per step), "
                              f"got {self.batch_size}")
        if not 0 <= self.balance <= 1:
            raise ConfigError(f"balance must be in [0, 1], got {self.balance}")
        if not 0 <= self.confidence < 1:
            raise ConfigError(f"confidence must be in [0, 1), got {self.confidence}")
        if not self.scales or min(self.scales) <= 0:
            raise ConfigError(f"scales must be positive multiples of the prediction size, got {list(self.scales)}")

    def for_device(self, device_type: str) -> Params:
        """These params with `auto` and 0 resolved: the recipe that actually runs on this device."""
        trunk = self.trunk if self.trunk != "auto" else "frozen" if device_type == "cpu" else "finetune"
        recipe = {name: value for name, value in RECIPES[trunk].items() if not getattr(self, name)}
        return dataclasses.replace(self, trunk=trunk, **recipe)

    @property
    def rescale_range(self) -> tuple[int, int]:
        """Finetuning rescales each image's short side to a random size in this range."""
        return self.base_size // 2, self.base_size * 2

    @property
    def inference(self) -> Inference:
        """Predictions are made around the mean of the training rescale range, the scale the network saw on
        average. At base_size itself, objects look smaller than in training on average, and the model spread
        them into the background (VOC round 2: 68.8% background predicted at 320, 70.5% at 400, its targets 73.5%)."""
        return Inference(sum(self.rescale_range) // 2, self.scales, self.refine, self.region_vote)


def key_params(cfg) -> dict:
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    params = cfg.train.for_device(device)  # the recipe that runs, as the runner resolves `device`
    trunk = weights_key(BackboneParams(params.backbone, params.weights), section="train")
    key = {**dataclasses.asdict(params), "backbone": trunk["name"], "weights": trunk, "seed": cfg.seed}
    if not params.tuned_blocks or params.trunk == "finetune":  # no blocks tuned (keys made before they could be stay
        del key["tuned_blocks"]  # valid), or all of them
    if not params.region_vote:  # as before votes existed: those keys stay valid
        del key["region_vote"]
    return key


def check(ctx: Context, params: Params) -> None:
    resolve_weights(BackboneParams(params.backbone, params.weights), section="train")
    if params.tuned_blocks and SPECS[params.backbone].family == "vit":  # before any feature is computed
        raise ConfigError("train.tuned_blocks needs a convolutional trunk (mobilenet_v2 or a resnet), not a ViT")
    world = _world()[1]
    if params.batch_size % world:
        raise ConfigError(f"train.batch_size={params.batch_size} does not split over {world} processes")
    synced = world > 1 and ctx.device.type == "cuda"  # SyncBatchNorm pools the processes' samples
    if not synced and params.batch_size // world < MIN_BATCH:
        raise ConfigError(f"train.batch_size={params.batch_size} leaves {params.batch_size // world} sample per process "
                          f"over {world} processes; BatchNorm needs {MIN_BATCH} (SyncBatchNorm pools them on GPUs only)")


@dataclasses.dataclass(frozen=True)
class Job:
    """What the stage trains on and where it works."""
    ctx: Context
    params: Params  # resolved for the device
    images: list[Path]
    masks: list[Path]  # their pseudo masks, whose non-zero pixels are the photos' salient regions
    num_classes: int
    work: Path  # survives kills; the entry is made from it at the end


def run(ctx: Context, params: Params) -> dict:
    params = params.for_device(ctx.device.type)
    entry = ctx.upstream["pseudo_masks"]
    items = read_items(entry)
    records = {r.rel: r for r in ctx.images}
    job = Job(ctx, params, [records[i["image"]].path for i in items], [entry / i["mask"] for i in items],
              class_count(entry), ctx.store.root / "train" / f"{ctx.key}.work")
    _check_pairs(job.images, job.masks)
    job.work.mkdir(parents=True, exist_ok=True)
    views = cached_views(job) if params.trunk == "frozen" else None
    names = [f"{stem_of(i['image'])}.png" for i in items]
    targets = [Target(mask, border=params.border) for mask in job.masks]
    log = []
    for round_index in range(1, params.rounds + 1):
        log += train_round(job, round_index, targets, views)
        predictions = predict_round(job, round_index, names, views)
        targets = [Target(labels, confidence, params.confidence) for labels, confidence in predictions]
    if _world()[0] == 0:
        _write_entry(job, items, log)
    return {"images": len(items), "classes": job.num_classes, "rounds": params.rounds, "epochs": params.epochs,
            "trunk": params.trunk, "processes": _world()[1], "final_loss": log[-1]["loss"] if log else None}


@dataclasses.dataclass(frozen=True)
class Target:
    """A round's target for one image: a label PNG, minus an ignore band `border` pixels wide along its
    label borders, minus the pixels whose confidence PNG (probability x 255) is below `threshold`."""
    labels: Path
    confidence: Path | None = None
    threshold: float = 0.0
    border: int = 0

    def read(self) -> np.ndarray:
        labels = read_label_png(self.labels)
        if self.border:
            window = np.ones((2 * self.border + 1,) * 2, np.uint8)
            labels = np.where(cv2.dilate(labels, window) != cv2.erode(labels, window), IGNORE, labels).astype(np.uint8)
        if self.confidence is not None and self.threshold:
            labels = np.where(read_label_png(self.confidence) < self.threshold * 255, IGNORE, labels).astype(np.uint8)
        return labels


def train_round(job: Job, round_index: int, targets: list[Target], views: CachedViews | None) -> list[dict]:
    """Train one round's network from its initial weights, resuming from the round's last checkpoint;
    its final weights go to round<N>_final.pt. Returns the round's log."""
    ctx, params, device = job.ctx, job.params, job.ctx.device
    rank, world = _world()
    final = job.work / f"round{round_index}_final.pt"
    if final.is_file():
        return load_checkpoint(final)["log"]
    torch.manual_seed(ctx.cfg.seed + round_index)  # the head's initialisation; the trunk's comes from `weights`
    model = Segmenter(BackboneParams(params.backbone, params.weights), job.num_classes).to(device)
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if views is None:
        trained, dataset = model, Photos(job, targets, round_index)
    else:
        model.trunk.load_state_dict(views.trunk)
        model.split(params.tuned_blocks)
        trained, dataset = HeadOnFeatures(model), FeatureCrops(job, targets, round_index, views)
    optimizer = torch.optim.Adam(parameter_groups(trained), lr=params.lr, weight_decay=params.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    latest, best = job.work / f"round{round_index}_latest.pt", job.work / f"round{round_index}_best.pt"
    meta = {"backbone": {"name": params.backbone, "weights": params.weights}, "num_classes": job.num_classes,
            "config": dataclasses.asdict(params), "inference": dataclasses.asdict(params.inference),
            "run_config": ctx.cfg.to_dict(),  # predict's saliency stage masks new photos with its settings
            "round": round_index, "epoch": 0, "log": [], "best_loss": None}
    if latest.is_file():
        state = load_checkpoint(latest, job.num_classes, params.backbone)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        meta.update({k: state[k] for k in ("epoch", "log", "best_loss")})
        if rank == 0:
            print(f"train: resuming round {round_index} after epoch {meta['epoch']} from {latest}")
    net = nn.parallel.DistributedDataParallel(trained) if world > 1 else trained
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=ctx.cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=params.batch_size // world, sampler=sampler,
                                         num_workers=ctx.cfg.workers if views is None else 0,  # crops of tensors in memory
                                         drop_last=True,  # the dataset holds a full batch
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    # Each round's new network is balanced on its own targets: unbalanced, a fresh round-2 network lost
    # VOC's two smallest clusters (IoU 0.12 -> 0.01 and 0.14 -> 0.01 against the ground truth).
    weights = class_weights(targets, job.num_classes, params.balance, ctx) if params.balance else torch.ones(job.num_classes)
    criterion = BalancedCrossEntropy(weights.to(device))
    for epoch in range(meta["epoch"] + 1, params.epochs + 1):
        started = time.perf_counter()
        lr = params.lr * (1 - (epoch - 1) / params.epochs) ** 0.9
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        dataset.epoch = epoch
        sampler.set_epoch(epoch)
        batches = ctx.progress(loader, f"train r{round_index} e{epoch}/{params.epochs}", unit="batch") if rank == 0 else loader
        epoch_loss = train_one_epoch(net, criterion, optimizer, scaler, batches)
        meta["log"].append({"round": round_index, "epoch": epoch, "loss": round(epoch_loss, 5), "lr": lr,
                            "seconds": round(time.perf_counter() - started, 2)})
        meta["epoch"] = epoch
        if rank == 0:
            if meta["best_loss"] is None or epoch_loss < meta["best_loss"]:
                meta["best_loss"] = epoch_loss
                save_checkpoint(best, model, meta)
            save_checkpoint(latest, model, meta, optimizer, scaler)
            print(f"train: round {round_index} epoch {epoch}/{params.epochs} loss {epoch_loss:.4f}")
        if world > 1:
            dist.barrier()
    if rank == 0:
        save_checkpoint(final, model, meta)
    if world > 1:
        dist.barrier()
    return meta["log"]


def train_one_epoch(net: nn.Module, criterion, optimizer, scaler, batches) -> float:
    """One pass over `batches` of (input, target); returns the mean loss over all processes."""
    device = next(net.parameters()).device
    net.train()
    total = torch.zeros(2, device=device)
    for batch in batches:
        loss = train_step(net, criterion, optimizer, scaler, [t.to(device, non_blocking=True) for t in batch])
        total += torch.stack([loss.detach().float(), torch.ones((), device=device)])
        if hasattr(batches, "set_postfix"):
            batches.set_postfix(loss=f"{loss.item():.3f}")
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return float(total[0] / total[1].clamp(min=1))


class BalancedCrossEntropy(nn.Module):
    """CrossEntropy weighted per class, averaged over the weights of the labelled pixels (as PyTorch's),
    but 0, not NaN, for a batch with none: confident-only targets can leave a crop all ignored."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(logits, target, weight=self.weight, ignore_index=IGNORE, reduction="sum")
        return total / self.weight[target[target != IGNORE]].sum().clamp(min=1e-12)


def train_step(net, criterion, optimizer, scaler, batch) -> torch.Tensor:
    """One update on a batch (inputs, targets): float16 autocast and the GradScaler on CUDA, plain float32 on the CPU."""
    inputs, target = batch
    with autocast(inputs.device):
        loss = criterion(net(inputs), target)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss


def predict_round(job: Job, round_index: int, names: list[str], views: CachedViews | None) -> list[tuple[Path, Path]]:
    """The round's (labels, confidence) PNGs for every training image, made as `predict` makes them
    (sharded over processes as the per-image stages are; finished files are kept)."""
    share = distributed.Share(*_world())
    state = load_checkpoint(job.work / f"round{round_index}_final.pt")
    model = Segmenter(BackboneParams(job.params.backbone, "random"), state["num_classes"])
    model.load_state_dict(state["model"])
    model.to(job.ctx.device).eval()
    if views is not None:  # the cached views end where the tuned blocks begin
        model.split(job.params.tuned_blocks)
    inference = Inference.from_dict(state["inference"])
    folder = job.work / f"round{round_index}_masks"
    pairs = [(folder / name, folder / "confidence" / name) for name in names]
    mine = [i for i in range(len(names)) if share.holds(i) and not pairs[i][0].is_file()]
    for i in job.ctx.progress(mine, f"predict r{round_index}"):
        foreground = read_label_png(job.masks[i]) if inference.region_vote else None
        labels, confidence = model.predict(load_rgb(job.images[i]), inference, None if views is None else views.features[i],
                                           foreground)
        atomic_write(pairs[i][1], lambda tmp: write_label_png(tmp, np.round(confidence * 255).astype(np.uint8)))
        atomic_write(pairs[i][0], lambda tmp: write_label_png(tmp, labels))  # last: marks the image done
    distributed.barrier()
    return pairs


def _write_entry(job: Job, items: list[dict], log: list[dict]) -> None:
    """latest.pt and best.pt of the last round, round<N>.pt of each earlier one (to compare rounds), the
    last round's predictions on the training images, and the log."""
    last, out = job.params.rounds, job.ctx.out
    for earlier in range(1, last):
        shutil.copyfile(job.work / f"round{earlier}_final.pt", out / f"round{earlier}.pt")
    shutil.copyfile(job.work / f"round{last}_final.pt", out / "latest.pt")
    shutil.copyfile(job.work / f"round{last}_best.pt", out / "best.pt")
    shutil.copytree(job.work / f"round{last}_masks", out / "masks", ignore=shutil.ignore_patterns("confidence"))
    write_items(out, [{"image": i["image"], "mask": f"masks/{stem_of(i['image'])}.png"} for i in items])
    with open(out / TRAIN_LOG, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["round", "epoch", "loss", "lr", "seconds"])
        writer.writeheader()
        writer.writerows(log)
    shutil.rmtree(job.work)


def _world() -> tuple[int, int]:
    """(rank, processes): from the process group, or torchrun's environment before it is joined."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return torchrun.rank(), torchrun.world_size()
def _check_pairs(images: list[Path], masks: list[Path]) -> None:
    """Every mask exists, is a label PNG, and has its image's size: otherwise stop before training."""
    for image, mask in zip(images, masks):
        try:
            with Image.open(image) as im:
                size = im.size
                if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF rotation by 90 degrees swaps the sides
                    size = size[::-1]
        except OSError as exc:
            raise InputError(f"{image}: cannot read this training image ({exc})") from None
        try:
            with Image.open(mask) as m:
                if m.mode not in ("P", "L"):
                    raise InputError(f"{mask}: pseudo mask must be an 8-bit label PNG, got mode {m.mode}")
                mask_size = m.size
        except OSError as exc:
            raise InputError(f"{mask}: missing or unreadable pseudo mask ({exc})") from None
        if mask_size != size:
            raise InputError(f"{mask} is {mask_size[0]}x{mask_size[1]} but its image {image} is {size[0]}x{size[1]}")




class Photos(torch.utils.data.Dataset):
    """Finetuning's samples: (image, target) pairs, augmented with a generator seeded by (seed, round,
    epoch, index). Fewer images than one batch are repeated (each repeat augmented anew) up to
    `batch_size` samples, so that every step, the last one included, has a full batch: BatchNorm cannot
    train on a single sample."""

    def __init__(self, job: Job, targets: list[Target], round_index: int):
        # torchvision is imported when training starts: it pulls in torch._dynamo, seconds a cached rerun does not need
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        self.images, self.targets, self.seed, self.round = job.images, targets, job.ctx.cfg.seed, round_index
        self.samples = max(len(job.images), job.params.batch_size)
        self.epoch = 0
        self.image_type, self.mask_type = tv_tensors.Image, tv_tensors.Mask
        self.transform = v2.Compose([
            v2.RandomResize(*job.params.rescale_range),
            v2.RandomCrop(job.params.crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}),
            v2.RandomHorizontalFlip(),
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def __len__(self):
        return self.samples

    def __getitem__(self, index):
        path, target = self.images[index % len(self.images)], self.targets[index % len(self.images)]
        try:
            rgb = load_rgb(path)
        except BadImage as exc:
            raise InputError(f"{path}: {exc}") from None
        image = self.image_type(torch.from_numpy(rgb).permute(2, 0, 1))
        mask = self.mask_type(torch.from_numpy(target.read()))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.round, self.epoch, index)) & 0x7FFFFFFF)
            image, mask = self.transform(image, mask)
        return image, mask


@dataclasses.dataclass(frozen=True)
class CachedViews:
    """The frozen trunk's features of every training image, at every inference view (`Segmenter.view_features`)."""
    trunk: dict[str, torch.Tensor]  # the weights that made them: every round's network gets these
    stride: int  # pixels of a view per feature cell
    features: list[list[torch.Tensor]]  # per image, per view: (C, h, w) float16, ~1 MB per view at 400 px


def cached_views(job: Job) -> CachedViews:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.ctx.cfg.seed)  # a random trunk (by request, or in tests) is the same on resume
        model = Segmenter(BackboneParams(job.params.backbone, job.params.weights), job.num_classes)
    model.to(job.ctx.device).eval()
    model.split(job.params.tuned_blocks)
    features = []
    for path in job.ctx.progress(job.images, "trunk features"):
        try:
            rgb = load_rgb(path)
        except BadImage as exc:
            raise InputError(f"{path}: {exc}") from None
        features.append([view.half().cpu() for view in model.view_features(rgb, job.params.inference)])
    return CachedViews(model.trunk.state_dict(), model.stride, features)


class HeadOnFeatures(nn.Module):
    """The segmenter's head and its trunk's tuned blocks (`Segmenter.split`), on the cached features
    before them: logits upsampled `upsampling` times, to the resolution of FeatureCrops' targets. The
    tuned blocks keep their BatchNorm statistics: batches of a few crops would only add noise to them."""

    def __init__(self, segmenter: Segmenter):
        super().__init__()
        self.head, self.upsampling = segmenter.head, loss_upsampling(segmenter.stride)
        self.tuned = nn.ModuleList(segmenter.top())

    def train(self, mode: bool = True) -> HeadOnFeatures:
        super().train(mode)
        for module in self.tuned.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        for block in self.tuned:
            features = block(features)
        return F.interpolate(self.head(features), scale_factor=self.upsampling, mode="bilinear", align_corners=False)


def parameter_groups(trained: nn.Module) -> list[dict]:
    """The optimizer's groups: pretrained tuned blocks learn at TUNED_LR_SCALE of the head's rate."""
    tuned = list(trained.tuned.parameters()) if isinstance(trained, HeadOnFeatures) else []
    known = {id(p) for p in tuned}
    groups = [{"params": [p for p in trained.parameters() if id(p) not in known], "lr_scale": 1.0}]
    return groups + ([{"params": tuned, "lr_scale": TUNED_LR_SCALE}] if tuned else [])


def loss_upsampling(stride: int) -> int:
    """Frozen training scores its logits at a quarter of the view's resolution, not at every pixel: the
    same bilinear logits, and a third less time per step on VOC (1.45 s -> 0.99 s a batch of 8 crops of
    20x20 cells, MobileNetV2 head, 1 thread)."""
    return max(1, stride // 4)


class FeatureCrops(torch.utils.data.Dataset):
    """Frozen training's samples: a crop of `crop_size` view pixels from one view of an image, chosen with
    a generator seeded by (seed, round, epoch, index): its feature cells and its target over them, at
    `loss_upsampling` pixels per cell (padded with zero features and ignored pixels where the view is smaller). A dataset smaller than a
    batch is repeated to fill it, as in Photos."""

    def __init__(self, job: Job, targets: list[Target], round_index: int, views: CachedViews):
        self.features, self.seed, self.round = views.features, job.ctx.cfg.seed, round_index
        self.cells = max(1, job.params.crop_size // views.stride)
        self.cell = loss_upsampling(views.stride)  # target pixels per feature cell
        self.samples = max(len(targets), job.params.batch_size)
        self.epoch = 0
        self.targets = []
        for target, image_views in zip(job.ctx.progress(targets, f"targets r{round_index}"), self.features):
            labels = target.read()
            at_views = []
            for index, view in enumerate(image_views):
                size = (view.shape[2] * self.cell, view.shape[1] * self.cell)
                resized = torch.from_numpy(cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST))
                at_views.append(resized.flip(-1) if index % 2 else resized)  # odd views are mirror images
            self.targets.append(at_views)

    def __len__(self):
        return self.samples

    def __getitem__(self, index):
        image = index % len(self.features)
        generator = torch.Generator().manual_seed(hash((self.seed, self.round, self.epoch, index)) & 0x7FFFFFFF)
        view = int(torch.randint(len(self.features[image]), (), generator=generator))
        features, target = self.features[image][view], self.targets[image][view]
        cells, cell = self.cells, self.cell
        pad_h, pad_w = max(0, cells - features.shape[1]), max(0, cells - features.shape[2])
        features = F.pad(features, (0, pad_w, 0, pad_h))
        target = F.pad(target, (0, pad_w * cell, 0, pad_h * cell), value=IGNORE)
        y = int(torch.randint(features.shape[1] - cells + 1, (), generator=generator))
        x = int(torch.randint(features.shape[2] - cells + 1, (), generator=generator))
        return (features[:, y:y + cells, x:x + cells].float(),
                target[y * cell:(y + cells) * cell, x * cell:(x + cells) * cell].long())


def class_weights(targets: list[Target], num_classes: int, balance: float, ctx: Context) -> torch.Tensor:
    """Per-class loss weights that balance the clusters among themselves: cluster c weighs its pixel
    frequency ** -balance, scaled so that the average object pixel weighs 1, as a background pixel does.
    Background keeps weight 1 so that where objects end stays the saliency stage's call (weighting it by
    frequency too made round-1 predictions spill objects over a quarter of the background on VOC).
    Clusters absent from the targets get 0."""
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for target in ctx.progress(targets, "class frequencies"):
        labels = torch.from_numpy(target.read()).flatten().long()
        counts += torch.bincount(labels[labels < num_classes], minlength=num_classes).double()
    objects = counts[1:] / counts[1:].sum().clamp(min=1)
    weights = torch.where(objects > 0, objects.clamp(min=1e-12) ** -balance, torch.zeros_like(objects))
    weights = weights / (weights * objects).sum().clamp(min=1e-12)
    return torch.cat([torch.ones(1, dtype=torch.float64), weights]).float()
