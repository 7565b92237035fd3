"""Cluster: k-means on the L2-normalised object vectors gives every object a pseudo-class.

faiss's spherical k-means (centroids re-normalised each iteration), seeded, best of `nredo`
restarts. Objects far from their centroid are the least reliable pseudo labels: per cluster,
those beyond the `core_fraction` quantile of cosine distance become ignore (255 in the masks).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from pipeline.context import Context
from pipeline.errors import ConfigError, InputError
from pipeline.faiss_runtime import faiss

VERSION = 1


@dataclasses.dataclass(frozen=True)
class Params:
    k: int = 20
    niter: int = 300
    nredo: int = 10
    core_fraction: float = 0.8  # per cluster, this fraction of objects nearest the centroid keep their label
    max_points_per_centroid: int = 256  # faiss subsamples larger sets for training (all points are assigned)

    def __post_init__(self):
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")
        if self.niter < 1 or self.nredo < 1:
            raise ConfigError(f"niter and nredo must be >= 1, got {self.niter}, {self.nredo}")
        if not 0.0 < self.core_fraction <= 1.0:
            raise ConfigError(f"core_fraction must be in (0, 1], got {self.core_fraction}")
        if self.max_points_per_centroid < 1:
            raise ConfigError(f"max_points_per_centroid must be >= 1, got {self.max_points_per_centroid}")


def key_params(cfg) -> dict:
    return {**dataclasses.asdict(cfg.cluster), "seed": cfg.seed}


def run(ctx: Context, params: Params) -> dict:
    vectors = np.ascontiguousarray(np.load(ctx.upstream["embed"] / "embeddings.npy"), dtype=np.float32)
    if len(vectors) < params.k:
        raise InputError(f"cluster.k={params.k} but only {len(vectors)} objects were found; lower cluster.k "
                         f"or lower objects.min_area")
    started = time.perf_counter()
    centroids, assignment, distance = spherical_kmeans(vectors, params, ctx.cfg.seed)
    core = core_mask(assignment, distance, params.k, params.core_fraction)
    np.save(ctx.out / "centroids.npy", centroids)
    np.save(ctx.out / "assignments.npy", assignment)
    np.save(ctx.out / "distances.npy", distance)
    np.save(ctx.out / "core.npy", core)
    sizes = np.bincount(assignment, minlength=params.k)
    return {"objects": len(vectors), "core_objects": int(core.sum()), "cluster_sizes": sizes.tolist(),
            "kmeans_seconds": round(time.perf_counter() - started, 3)}


def spherical_kmeans(vectors: np.ndarray, params: Params, seed: int):
    """(centroids (k, d), assignment (n,) int32, cosine distance to the assigned centroid (n,) float32)."""
    kmeans = faiss.Kmeans(vectors.shape[1], params.k, niter=params.niter, nredo=params.nredo, seed=seed,
                          spherical=True, max_points_per_centroid=params.max_points_per_centroid,
                          min_points_per_centroid=1, verbose=False)
    kmeans.train(vectors)
    centroids = kmeans.centroids / np.maximum(np.linalg.norm(kmeans.centroids, axis=1, keepdims=True), 1e-12)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(centroids.astype(np.float32))
    similarity, nearest = index.search(vectors, 1)
    return centroids.astype(np.float32), nearest[:, 0].astype(np.int32), (1.0 - similarity[:, 0]).astype(np.float32)


def core_mask(assignment: np.ndarray, distance: np.ndarray, k: int, core_fraction: float) -> np.ndarray:
    """True for objects within their cluster's `core_fraction` quantile of distance to the centroid."""
    core = np.ones(len(assignment), dtype=bool)
    if core_fraction >= 1.0:
        return core
    for cluster_id in range(k):
        members = np.flatnonzero(assignment == cluster_id)
        if len(members):
            limit = np.quantile(distance[members], core_fraction, method="higher")
            core[members] = distance[members] <= limit
    return core
