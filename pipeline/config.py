"""Run configuration: the run-level settings and the machinery that reads a config into frozen dataclasses.

A config comes from defaults, then an optional YAML file, then `section.key=value`
overrides. Unknown keys, wrong types and invalid values raise ConfigError, naming the
key, before any work starts. The composed config, these settings plus one section per stage
(each stage's `Params`), is `pipeline.runner.Config`: the frame knows no stage.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from pipeline.backbones import BackboneParams
from pipeline.errors import ConfigError
from pipeline.images import DEFAULT_MAX_PIXELS

DEVICES = ("cpu", "cuda", "auto")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What every stage may read besides its own section: the backbone they share and how the run goes."""
    backbone: BackboneParams = BackboneParams()
    seed: int = 0
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    workers: int = 2
    strict: bool = False  # the first bad image is fatal instead of skipped
    hash_content: bool = False  # fingerprint images by content instead of (path, size, mtime)
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped as decompression bombs

    def __post_init__(self):
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be >= 1, got {self.max_pixels}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_config(cls: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Defaults <- YAML file <- `section.key=value` overrides, validated into the dataclass `cls`."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        try:
            node[leaf] = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            node[leaf] = text
    return _build(cls, raw, prefix="")


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names, key=str)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s} (valid keys: {', '.join(prefix + n for n in sorted(names))})")
    values = {}
    for name, value in raw.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value if value is not None else {}, prefix=f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, kind, f"{prefix}{name}")
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}" if prefix and not str(exc).startswith(prefix) else str(exc)) from None


def _coerce(value, kind, key: str):
    """Check `value` against the annotation `kind`; the few conversions are lossless (int -> float, tuple from list)."""
    origin = typing.get_origin(kind)
    if origin is Literal:
        if value not in typing.get_args(kind):
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, typing.get_args(kind)))}, got {value!r}")
        return value
    if origin in (tuple,):
        args = typing.get_args(kind)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported annotation for {key}: {kind}")
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if kind is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported annotation for {key}: {kind}")


def config_from_dict(cls: type[T], raw: dict) -> T:
    """A `cls` from a dict such as its `to_dict()` wrote (the workdir's state)."""
    return _build(cls, raw, prefix="")
