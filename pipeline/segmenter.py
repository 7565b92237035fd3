"""DeepLabv3 segmenter: torchvision's DeepLabHead (ASPP) on a configurable trunk, and its checkpoints.

Trunks: ResNet-50 dilated to output stride 8 (as COMUS), MobileNetV2 dilated to 16 (fast on CPU), or
a ViT's patch tokens. Checkpoints are self-describing (format, backbone, class count, config, epoch,
optimizer, scaler, RNG states), written atomically and read with `weights_only=True`, so `predict`
needs nothing but the file.
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.artifacts import atomic_write
from pipeline.backbones import IMAGENET_MEAN, IMAGENET_STD, BackboneParams, build_trunk
from pipeline.errors import ConfigError, InputError
from pipeline.refine import RefineParams, refine_scores

FORMAT = "objseg.segmenter/4"  # 2: MobileNetV2 heads read 320 channels; 3: predict_size replaces base_size;
# 4: `inference` (short side, scales, refinement) replaces predict_size (`region_vote`, added later, is False when absent)
CHANNELS = {"resnet": 2048, "mobilenet_v2": 320}
STRIDES = {"resnet": 8, "mobilenet_v2": 16}  # dilated output strides; a ViT's is its patch size


@dataclasses.dataclass(frozen=True)
class Inference:
    """How a segmenter predicts, recorded in its checkpoint so that `predict` segments new photos as
    training predicted its own: the softmax scores of the photo at each scale of `short_side` and of its
    mirror image are averaged, optionally refined along the photo's colour edges, then argmaxed; with
    `region_vote`, each salient region of the photo then takes one object class by vote (`region_votes`):
    such an inference needs the photo's saliency foreground."""
    short_side: int
    scales: tuple[float, ...] = (1.0,)
    refine: RefineParams = RefineParams()
    region_vote: bool = False

    @classmethod
    def from_dict(cls, raw: dict) -> Inference:
        return cls(raw["short_side"], tuple(raw["scales"]), RefineParams(**raw["refine"]), raw.get("region_vote", False))


class Segmenter(nn.Module):
    def __init__(self, backbone: BackboneParams, num_classes: int):
        from torchvision.models.segmentation.deeplabv3 import DeepLabHead  # imported late, as in pipeline.backbones

        super().__init__()
        self.trunk, self.family = build_trunk(backbone, dilated=True, section="train")
        if self.family == "mobilenet_v2":
            # ASPP reads the 320-channel last block, not the 1x1 conv to 1280 channels after it (as the
            # DeepLabv3 MobileNetV2 ports do): that conv adds nothing spatial and made ASPP cost 4x as much.
            del self.trunk.features[-1]
        channels = self.trunk.embed_dim if self.family == "vit" else CHANNELS[self.family]
        self.head = DeepLabHead(channels, num_classes)
        self.stride = self.trunk.patch_embed.patch_size[0] if self.family == "vit" else STRIDES[self.family]
        if self.family != "vit":  # oneDNN's CPU convolutions (depthwise above all) run faster channels-last
            self.trunk.to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.tuned_blocks = 0  # the trunk's last blocks, run on the views' features rather than in them (`split`)
        self._chain = self._blocks() if self.family != "vit" else []  # a plain list: the modules stay the trunk's

    def split(self, blocks: int) -> None:
        """Move the trunk's last `blocks` blocks from `view_features` to `top`, which `logits` runs on the
        views first: a frozen-trunk recipe can then cache the features before them and train them with the
        head. The network's function and state dict do not change."""
        if blocks and self.family == "vit":  # a crop of patch tokens would lose the class token they attend to
            raise ConfigError("train.tuned_blocks needs a convolutional trunk (mobilenet_v2 or a resnet), not a ViT")
        if blocks and not 0 < blocks < len(self._chain):
            raise ConfigError(f"train.tuned_blocks must be in [0, {len(self._chain) - 1}] for this trunk, got {blocks}")
        self.tuned_blocks = blocks

    def top(self) -> list[nn.Module]:
        """The blocks `split` moved after the views' features (modules of the trunk, not registered twice)."""
        return self._chain[len(self._chain) - self.tuned_blocks:]

    def _blocks(self) -> list[nn.Module]:
        """The convolutional trunk's blocks in order, the first being the stem."""
        if self.family == "mobilenet_v2":
            return list(self.trunk.features)
        t = self.trunk
        stem = nn.Sequential(t.conv1, t.bn1, t.relu, t.maxpool)
        return [stem, *t.layer1, *t.layer2, *t.layer3, *t.layer4]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's feature map (N, C, h, w) before `top`, for ImageNet-normalised images."""
        if self.family != "vit":
            x = x.contiguous(memory_format=torch.channels_last)
            for block in self._chain[:len(self._chain) - self.tuned_blocks]:
                x = block(x)
            return x
        tokens = self.trunk.forward_features(x)[:, self.trunk.num_prefix_tokens:]
        h, w = x.shape[2] // self.stride, x.shape[3] // self.stride
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits at the feature cells from `features`' maps."""
        for block in self.top():
            features = block(features)
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, classes, H, W) for ImageNet-normalised images (N, 3, H, W)."""
        return F.interpolate(self.logits(self.features(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)

    @torch.inference_mode()
    def view_features(self, rgb: np.ndarray, inference: Inference) -> list[torch.Tensor]:
        """Trunk features (C, h, w) of one uint8 RGB image at each scale of `inference`, each followed by
        its mirror image's (not mirrored back). Views are multiples of the stride, so that feature cell
        (i, j) covers pixels [i * stride, (i + 1) * stride) of the view."""
        height, width = rgb.shape[:2]
        device = self.mean.device
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].to(device).float() / 255
        views = []
        for scale in inference.scales:
            factor = inference.short_side * scale / min(height, width)
            size = [max(self.stride, round(d * factor / self.stride) * self.stride) for d in (height, width)]
            view = (F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True) - self.mean) / self.std
            views += [self.features(view)[0], self.features(view.flip(-1))[0]]
        return views

    @torch.inference_mode()
    def scores(self, views: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Class probabilities (classes, H, W) at the photo's `size`: the mean over `view_features`' views."""
        total = 0
        for index, features in enumerate(views):
            logits = self.logits(features[None].to(self.mean.device, self.mean.dtype))
            logits = logits.flip(-1) if index % 2 else logits
            total = total + F.interpolate(logits, size=size, mode="bilinear", align_corners=False).softmax(1)[0]
        return total / len(views)

    def predict(self, rgb: np.ndarray, inference: Inference, views: list[torch.Tensor] | None = None,
                foreground: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(class ids, confidence) (H, W) of one uint8 RGB image: the uint8 id of the highest refined
        probability, and that probability (float32); with `inference.region_vote`, the salient regions of
        `foreground` (the photo's saliency mask, non-zero = salient) voted. `views` are its `view_features`
        when known."""
        if inference.region_vote and (foreground is None or foreground.shape != rgb.shape[:2]):
            raise ValueError(f"this inference votes over salient regions: it needs the photo's {rgb.shape[:2]} "
                             f"foreground, got {None if foreground is None else foreground.shape}")
        views = self.view_features(rgb, inference) if views is None else views
        probabilities = self.scores(views, rgb.shape[:2]).permute(1, 2, 0).cpu().numpy()
        # Only classes that win somewhere are refined (3-4 of VOC's 21 in a photo: the filter's cost is per
        # class); a class that wins nowhere before refinement stays out of the argmax after it.
        present = np.unique(probabilities.argmax(-1))
        refined = refine_scores(rgb, np.ascontiguousarray(probabilities[..., present]), inference.refine)
        labels, confidence = present[refined.argmax(-1)].astype(np.uint8), refined.max(-1)
        if inference.region_vote:
            return region_votes(probabilities, salient_regions(foreground), labels, confidence)
        return labels, confidence


def salient_regions(foreground: np.ndarray) -> np.ndarray:
    """(H, W) int32: 1..n on the 8-connected components of a saliency mask's non-zero pixels, 0 elsewhere:
    the photo's objects as the objects stage splits them, the components too small to be objects included."""
    return cv2.connectedComponents((foreground != 0).astype(np.uint8), connectivity=8)[1]


def region_votes(probabilities: np.ndarray, regions: np.ndarray, labels: np.ndarray, confidence: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Each region (> 0) of `regions` painted with the object class (not background) of highest mean
    probability over its pixels, its confidence that mean; `labels` and `confidence` stay elsewhere. The
    saliency model draws the shapes and the segmenter names them, object by object, as the pseudo masks
    paint one cluster per object (README, "The segmenter"). `probabilities` (H, W, C) are the unrefined averaged scores."""
    count = int(regions.max(initial=0))
    if not count:
        return labels, confidence
    flat = regions.ravel()
    sums = np.stack([np.bincount(flat, probabilities[..., c].ravel(), count + 1)
                     for c in range(probabilities.shape[-1])], axis=-1)[1:]
    winner = sums[:, 1:].argmax(1) + 1
    mean = sums[np.arange(count), winner] / np.bincount(flat, minlength=count + 1)[1:]
    inside = regions > 0
    labels = np.where(inside, np.concatenate([[0], winner])[regions], labels).astype(np.uint8)
    confidence = np.where(inside, np.concatenate([[0.0], mean])[regions], confidence).astype(np.float32)
    return labels, confidence


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                      *np_state[2:]],
            "python": random.getstate(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model: nn.Module, meta: dict, optimizer=None, scaler=None) -> None:
    """Atomically write a self-describing checkpoint; `meta` holds backbone, num_classes, config, round, epoch..."""
    payload = {"format": FORMAT, **meta, "model": model.state_dict(), "rng": rng_state(),
               "optimizer": optimizer.state_dict() if optimizer else None, "scaler": scaler.state_dict() if scaler else None}
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path, num_classes: int | None = None, backbone: str | None = None) -> dict:
    """Read a checkpoint of ours, checking it fits the expected class count and backbone when given."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused, truncated zip, not a torch file at all
        raise InputError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{path}: not an objseg segmenter checkpoint (format {payload.get('format') if isinstance(payload, dict) else None!r})")
    if num_classes is not None and payload["num_classes"] != num_classes:
        raise InputError(f"{path} is for {payload['num_classes']} classes, not {num_classes}")
    if backbone is not None and payload["backbone"]["name"] != backbone:
        raise InputError(f"{path} is for backbone {payload['backbone']['name']}, not {backbone}")
    return payload


def segmenter_from_checkpoint(path: Path, device: torch.device) -> tuple[Segmenter, dict]:
    """The network of a checkpoint, ready to predict, and the checkpoint (its `inference` says how)."""
    payload = load_checkpoint(path)
    # The trunk's weights come from the checkpoint, so build it untrained rather than from a file.
    backbone = dataclasses.replace(BackboneParams(**payload["backbone"]), weights="random")
    model = Segmenter(backbone, payload["num_classes"])
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), payload
