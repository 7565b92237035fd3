"""Train: a DeepLabv3 segmenter learns from the pseudo masks, then from its own predictions.

Round 1 learns the pseudo masks (CrossEntropy, ignore 255) with Adam and DeepLab's poly learning-rate
decay, random rescaling (0.5-2x), crop and flip applied to image and mask alike. The loss weighs each
cluster by its pixel frequency among object pixels to the power -`balance`, so that small clusters are
not drowned by large ones; background keeps weight 1. Each later round trains a new network, from the
initial trunk weights as in COMUS's self-training, on the previous round's predictions over the training
images, which fill in objects the saliency stage missed: every round is the same recipe on new targets.
Predictions are made at the mean scale of training (`predict_size`). Checkpoints go to a work folder that
survives a kill, so an interrupted `train` resumes at its last epoch. Under `torchrun`, DDP with a
DistributedSampler splits each global batch over the processes (gloo on CPU, nccl and SyncBatchNorm on
GPU); rank 0 alone writes. Augmentations are seeded per (seed, round, epoch, image), so the data a step
sees does not depend on the number of processes or workers.
"""
from __future__ import annotations

import csv
import dataclasses
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

from pipeline import torchrun
from pipeline.artifacts import atomic_write
from pipeline.backbones import IMAGENET_MEAN, IMAGENET_STD, BackboneName, BackboneParams, resolve_weights, weights_key
from pipeline.context import Context, write_items
from pipeline.errors import ConfigError, InputError
from pipeline.images import BadImage, load_rgb, read_label_png, stem_of, write_label_png
from pipeline.outputs import IGNORE, TRAIN_LOG, class_count, read_items
from pipeline.precision import autocast
from pipeline.segmenter import Segmenter, load_checkpoint, save_checkpoint, set_rng_state

VERSION = 9  # 2: MobileNetV2 dilated to output stride 16; 3: 320-channel MobileNetV2 head, poly lr, class balance,
# warm rounds, flip TTA; 4: background keeps weight 1 in the class balance; 5: class balance in round 1 only;
# 6: every round starts from the initial trunk weights, not from the previous round's network;
# 7: predictions at the training crops' mean scale (predict_size), not at base_size;
# 8: every round balanced on its own targets; 9: a dataset smaller than the batch is repeated to fill it
# (a batch of one sample crashed BatchNorm), so every step sees batch_size samples
MIN_BATCH = 2  # BatchNorm in training needs 2 samples per channel (the head's image-pooling branch is 1x1)


@dataclasses.dataclass(frozen=True)
class Params:
    backbone: BackboneName = "dino_resnet50"  # the trunk: self-supervised like the rest; ResNets are dilated to output stride 8
    weights: str = ""  # trunk weights: a file, "" = torch.hub's cache, "random" = untrained, by request only
    rounds: int = 1  # 1 = learn the pseudo masks; each further round learns the previous round's predictions
    epochs: int = 10  # per round
    batch_size: int = 8  # global: split over the processes under torchrun; a smaller dataset is repeated to fill it
    lr: float = 6e-5  # initial; decays as (1 - epoch / epochs) ** 0.9 (DeepLab's poly schedule)
    balance: float = 0.5  # cluster weight = its pixel frequency ** -balance among the round's object pixels; 0 = plain CrossEntropy
    weight_decay: float = 0.0
    crop_size: int = 512
    base_size: int = 520  # short side is rescaled to a random size in [0.5, 2] x base_size; predictions use predict_size

    def __post_init__(self):
        for name in ("rounds", "epochs", "crop_size", "base_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < MIN_BATCH:
            raise ConfigError(f"batch_size must be >= {MIN_BATCH} (BatchNorm needs {MIN_BATCH} samples per step), "
                              f"got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.balance <= 1:
            raise ConfigError(f"balance must be in [0, 1], got {self.balance}")

    @property
    def rescale_range(self) -> tuple[int, int]:
        """Training rescales each image's short side to a random size in this range."""
        return self.base_size // 2, self.base_size * 2

    @property
    def predict_size(self) -> int:
        """The short side predictions are made at: the mean of the training rescale range, the scale the network
        saw on average. At base_size itself, objects look smaller than in training on average, and the model
        spread them into the background (VOC round 2: 68.8% background predicted at 320, 70.5% at 400, its
        targets 73.5%)."""
        return sum(self.rescale_range) // 2


def key_params(cfg) -> dict:
    trunk = weights_key(BackboneParams(cfg.train.backbone, cfg.train.weights), section="train")
    return {**dataclasses.asdict(cfg.train), "backbone": trunk["name"], "weights": trunk, "seed": cfg.seed}


def check(ctx: Context, params: Params) -> None:
    resolve_weights(BackboneParams(params.backbone, params.weights), section="train")
    world = _world()[1]
    if params.batch_size % world:
        raise ConfigError(f"train.batch_size={params.batch_size} does not split over {world} processes")
    synced = world > 1 and ctx.device.type == "cuda"  # SyncBatchNorm pools the processes' samples
    if not synced and params.batch_size // world < MIN_BATCH:
        raise ConfigError(f"train.batch_size={params.batch_size} leaves {params.batch_size // world} sample per process "
                          f"over {world} processes; BatchNorm needs {MIN_BATCH} (SyncBatchNorm pools them on GPUs only)")


def run(ctx: Context, params: Params) -> dict:
    rank, world = _world()
    entry = ctx.upstream["pseudo_masks"]
    items = read_items(entry)
    num_classes = class_count(entry)
    records = {r.rel: r for r in ctx.images}
    images = [records[i["image"]].path for i in items]
    _check_pairs(images, [entry / i["mask"] for i in items])
    work = ctx.store.root / "train" / f"{ctx.key}.work"  # survives kills; the entry is made from it at the end
    work.mkdir(parents=True, exist_ok=True)
    targets = [entry / i["mask"] for i in items]
    log_rows = []
    for round_index in range(1, params.rounds + 1):
        final = work / f"round{round_index}_final.pt"
        if not final.is_file():
            log_rows += _train_round(ctx, params, round_index, images, targets, num_classes, work, rank, world)
        else:
            log_rows += load_checkpoint(final)["log"]
        targets = _predict_all(ctx, params, final, images, [i["image"] for i in items],
                               work / f"round{round_index}_masks", rank, world)
    if rank == 0:
        last = work / f"round{params.rounds}_final.pt"
        shutil.copyfile(last, ctx.out / "latest.pt")
        shutil.copyfile(work / f"round{params.rounds}_best.pt", ctx.out / "best.pt")
        shutil.copytree(work / f"round{params.rounds}_masks", ctx.out / "masks")
        write_items(ctx.out, [{"image": i["image"], "mask": f"masks/{stem_of(i['image'])}.png"} for i in items])
        with open(ctx.out / TRAIN_LOG, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["round", "epoch", "loss", "lr", "seconds"])
            writer.writeheader()
            writer.writerows(log_rows)
        shutil.rmtree(work)
    return {"images": len(items), "classes": num_classes, "rounds": params.rounds, "epochs": params.epochs,
            "processes": world, "final_loss": log_rows[-1]["loss"] if log_rows else None}


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


class PseudoLabelled(torch.utils.data.Dataset):
    """(image, target) pairs, augmented with a generator seeded by (seed, round, epoch, index). Fewer images
    than one batch are repeated (each repeat augmented anew) up to `batch_size` samples, so that every step,
    the last one included, has a full batch: BatchNorm cannot train on a single sample."""

    def __init__(self, images, targets, params: Params, seed: int, round_index: int):
        # torchvision is imported when training starts: it pulls in torch._dynamo, seconds a cached rerun does not need
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        self.images, self.targets, self.seed, self.round = images, targets, seed, round_index
        self.samples = max(len(images), params.batch_size)
        self.epoch = 0
        self.image_type, self.mask_type = tv_tensors.Image, tv_tensors.Mask
        self.transform = v2.Compose([
            v2.RandomResize(*params.rescale_range),
            v2.RandomCrop(params.crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}),
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
        mask = self.mask_type(torch.from_numpy(read_label_png(target)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.round, self.epoch, index)) & 0x7FFFFFFF)
            image, mask = self.transform(image, mask)
        return image, mask


def _train_round(ctx, params, round_index, images, targets, num_classes, work, rank, world) -> list[dict]:
    device = ctx.device
    torch.manual_seed(ctx.cfg.seed + round_index)  # the head's initialisation; the trunk's comes from `weights`
    model = Segmenter(BackboneParams(params.backbone, params.weights), num_classes).to(device)
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    latest, best = work / f"round{round_index}_latest.pt", work / f"round{round_index}_best.pt"
    meta = {"backbone": {"name": params.backbone, "weights": params.weights}, "num_classes": num_classes,
            "config": dataclasses.asdict(params), "round": round_index, "epoch": 0, "log": [], "best_loss": None,
            "predict_size": params.predict_size}
    if latest.is_file():
        state = load_checkpoint(latest, num_classes, params.backbone)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        meta.update({k: state[k] for k in ("epoch", "log", "best_loss")})
        if rank == 0:
            print(f"train: resuming round {round_index} after epoch {meta['epoch']} from {latest}")
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    dataset = PseudoLabelled(images, targets, params, ctx.cfg.seed, round_index)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=ctx.cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=params.batch_size // world, sampler=sampler,
                                         num_workers=ctx.cfg.workers, drop_last=True,  # the dataset holds a full batch
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    # Each round's new network is balanced on its own targets: unbalanced, a fresh round-2 network lost
    # VOC's two smallest clusters (IoU 0.12 -> 0.01 and 0.14 -> 0.01 against the ground truth).
    weights = class_weights(targets, num_classes, params.balance, ctx) if params.balance else None
    criterion = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device), ignore_index=IGNORE)
    for epoch in range(meta["epoch"] + 1, params.epochs + 1):
        started = time.perf_counter()
        lr = params.lr * (1 - (epoch - 1) / params.epochs) ** 0.9
        for group in optimizer.param_groups:
            group["lr"] = lr
        dataset.epoch = epoch
        sampler.set_epoch(epoch)
        net.train()
        total = torch.zeros(2, device=device)
        bar = ctx.progress(loader, f"train r{round_index} e{epoch}/{params.epochs}", unit="batch") if rank == 0 else loader
        for image, mask in bar:
            image, mask = image.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            loss = train_step(net, criterion, optimizer, scaler, image, mask)
            total += torch.stack([loss.detach().float(), torch.ones((), device=device)])
            if rank == 0 and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if world > 1:
            dist.all_reduce(total)
        epoch_loss = float(total[0] / total[1].clamp(min=1))
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
        save_checkpoint(work / f"round{round_index}_final.pt", model, meta)
    if world > 1:
        dist.barrier()
    return meta["log"]


def train_step(net, criterion, optimizer, scaler, image, mask) -> torch.Tensor:
    """One update on a batch: float16 autocast and the GradScaler on CUDA, plain float32 on the CPU."""
    with autocast(image.device):
        loss = criterion(net(image), mask)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss


def class_weights(targets: list[Path], num_classes: int, balance: float, ctx: Context) -> torch.Tensor:
    """Per-class loss weights that balance the clusters among themselves: cluster c weighs its pixel
    frequency ** -balance, scaled so that the average object pixel weighs 1, as a background pixel does.
    Background keeps weight 1 so that where objects end stays the saliency stage's call (weighting it by
    frequency too made round-1 predictions spill objects over a quarter of the background on VOC).
    Clusters absent from the targets get 0."""
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for path in ctx.progress(targets, "class frequencies"):
        labels = torch.from_numpy(read_label_png(path)).flatten().long()
        counts += torch.bincount(labels[labels < num_classes], minlength=num_classes).double()
    objects = counts[1:] / counts[1:].sum().clamp(min=1)
    weights = torch.where(objects > 0, objects.clamp(min=1e-12) ** -balance, torch.zeros_like(objects))
    weights = weights / (weights * objects).sum().clamp(min=1e-12)
    return torch.cat([torch.ones(1, dtype=torch.float64), weights]).float()


def _predict_all(ctx, params, checkpoint, images, names, folder: Path, rank: int, world: int) -> list[Path]:
    """The round's predictions on every training image (sharded over processes; finished files are kept)."""
    state = load_checkpoint(checkpoint)
    model = Segmenter(BackboneParams(params.backbone, "random"), state["num_classes"])
    model.load_state_dict(state["model"])
    model.to(ctx.device).eval()
    paths = [folder / f"{stem_of(name)}.png" for name in names]
    mine = [i for i in range(len(images)) if i % world == rank and not paths[i].is_file()]
    for i in ctx.progress(mine, f"predict r{state['round']}"):
        labels = model.predict(load_rgb(images[i]), params.predict_size)
        atomic_write(paths[i], lambda tmp: write_label_png(tmp, labels))
    if world > 1:
        dist.barrier()
    return paths
