"""Cluster names and cluster selections the user gives after looking at the report.

A cluster id is the 0-based cluster index of the cluster stage; its pixels have the value id + 1 in the
pseudo masks. `names.yaml` maps ids to names, e.g. `3: person` (or `"3": person`); clusters it leaves
out keep the name `cluster_<id>`. The names make the classes of the export and of the report's masks:
clusters with one name are one class, a cluster named `ignore` becomes ignore (255) and one named
`background` becomes background (0); the other classes are numbered 1..n in order of their first cluster id.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import yaml

from pipeline.errors import InputError
from pipeline.outputs import IGNORE

BACKGROUND_NAME, IGNORE_NAME = "background", "ignore"  # names that send a cluster to mask value 0 or 255


@dataclasses.dataclass(frozen=True)
class Classes:
    """The classes the cluster names make."""
    names: tuple[str, ...]  # class value -> name: background, then classes 1..n
    of_cluster: tuple[int, ...]  # cluster id -> class value (0..n, or 255)

    def value_map(self) -> np.ndarray:
        """A 256-entry table from pseudo-mask values (cluster id + 1) to class values; 0 and 255 stay."""
        table = np.arange(256, dtype=np.uint8)
        table[1:len(self.of_cluster) + 1] = self.of_cluster
        return table


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
    return names


def classes_of(k: int, names: dict[int, str]) -> Classes:
    """The classes of a run with `k` clusters named by `names` (see the module's docstring)."""
    values = {BACKGROUND_NAME: 0, IGNORE_NAME: IGNORE}
    of_cluster = [values.setdefault(cluster_name(c, names), len(values) - 1) for c in range(k)]
    classes = sorted((v, n) for n, v in values.items() if v != IGNORE)
    return Classes(tuple(n for _, n in classes), tuple(of_cluster))


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


def _cluster_id(value, k: int, what: str) -> int:
    # bool is an int in Python; `true: person` is a typo, not cluster 1
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())):
        raise InputError(f"{what} is not a cluster id (an integer 0..{k - 1})")
    cluster_id = int(value)
    if not 0 <= cluster_id < k:
        raise InputError(f"{what} is not a cluster of this run (ids 0..{k - 1}; mask value = id + 1)")
    return cluster_id
