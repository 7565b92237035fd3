"""Cluster names and cluster selections the user gives after looking at the report.

A cluster id is the 0-based cluster index of the cluster stage; its pixels have the value id + 1 in the
pseudo masks. `names.yaml` maps ids to names, e.g. `3: person` (or `"3": person`); clusters it leaves
out keep the name `cluster_<id>`.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.errors import InputError


def load_names(path: str | Path, k: int) -> dict[int, str]:
    """{cluster id: name} from a names.yaml written for a run with `k` clusters; InputError naming the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InputError(f"cannot read cluster names {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError(f"{path}: must map cluster ids to names (e.g. `3: person`), got {type(raw).__name__}")
    names: dict[int, str] = {}
    for key, name in raw.items():
        cluster_id = _cluster_id(key, k, f"{path}: {key!r}")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{path}: the name of cluster {cluster_id} must be a non-empty string, got {name!r}")
        if cluster_id in names:
            raise InputError(f"{path}: cluster {cluster_id} is named twice")
        names[cluster_id] = name.strip()
    seen: dict[str, int] = {}
    for cluster_id, name in sorted(names.items()):
        if name in seen:
            raise InputError(f"{path}: clusters {seen[name]} and {cluster_id} have the same name {name!r}")
        seen[name] = cluster_id
    return names


def parse_clusters(text: str) -> list[int]:
    """Cluster ids from `--clusters 3,7`."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise InputError(f"--clusters {text!r}: give cluster ids separated by commas, e.g. 3,7")
    return [int(p) for p in parts]


def check_clusters(clusters, k: int) -> list[int]:
    """The chosen cluster ids, sorted and unique; InputError for one outside 0..k-1."""
    if not clusters:
        raise InputError("--clusters: choose at least one cluster")
    return sorted({_cluster_id(c, k, f"--clusters: {c!r}") for c in clusters})


def cluster_name(cluster_id: int, names: dict[int, str]) -> str:
    return names.get(cluster_id, f"cluster_{cluster_id}")


def class_names(k: int, names: dict[int, str]) -> list[str]:
    """Names of the mask values 0..k: background, then each cluster."""
    return ["background"] + [cluster_name(c, names) for c in range(k)]


def _cluster_id(value, k: int, what: str) -> int:
    # bool is an int in Python; `true: person` is a typo, not cluster 1
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())):
        raise InputError(f"{what} is not a cluster id (an integer 0..{k - 1})")
    cluster_id = int(value)
    if not 0 <= cluster_id < k:
        raise InputError(f"{what} is not a cluster of this run (ids 0..{k - 1}; mask value = id + 1)")
    return cluster_id
