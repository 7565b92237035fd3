"""Cluster: the L2-normalised object vectors are grouped into `k` pseudo-classes.

`kmeans` (default): faiss's spherical k-means (centroids re-normalised each iteration), seeded, best
of `nredo` restarts; scales to 10^6 objects. `spectral` (the COMUS paper's choice): spectral clustering
of the symmetric `neighbours`-nearest-neighbour graph, built with faiss's exact search (its cost grows
with the square of the object count), then k-means on the graph's leading eigenvectors; it follows
elongated clusters that k-means cuts in pieces. Either way, objects far from their cluster's centroid
are the least reliable pseudo labels: per cluster, those beyond the `core_fraction` quantile of cosine
distance become ignore (255 in the masks).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import scipy.sparse
import scipy.sparse.linalg

from pipeline.context import Context
from pipeline.errors import ConfigError, InputError
from pipeline.faiss_runtime import faiss

VERSION = 1
MAX_K = 254  # mask values: 0 background, 1..k clusters, 255 ignore


@dataclasses.dataclass(frozen=True)
class Params:
    k: int = 20
    method: str = "kmeans"  # kmeans | spectral
    neighbours: int = 30  # spectral: graph neighbours of each object (itself included)
    niter: int = 300
    nredo: int = 10
    core_fraction: float = 0.8  # per cluster, this fraction of objects nearest the centroid keep their label
    max_points_per_centroid: int = 256  # faiss subsamples larger sets for training (all points are assigned)

    def __post_init__(self):
        if not 1 <= self.k <= MAX_K:
            raise ConfigError(f"k must be in [1, {MAX_K}] (pseudo masks are 8-bit: 0 background, cluster + 1, "
                              f"255 ignore), got {self.k}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.neighbours < 2:
            raise ConfigError(f"neighbours must be >= 2, got {self.neighbours}")
        if self.niter < 1 or self.nredo < 1:
            raise ConfigError(f"niter and nredo must be >= 1, got {self.niter}, {self.nredo}")
        if not 0.0 < self.core_fraction <= 1.0:
            raise ConfigError(f"core_fraction must be in (0, 1], got {self.core_fraction}")
        if self.max_points_per_centroid < 1:
            raise ConfigError(f"max_points_per_centroid must be >= 1, got {self.max_points_per_centroid}")


def key_params(cfg) -> dict:
    params = dataclasses.asdict(cfg.cluster)
    if params["method"] == "kmeans":  # k-means keys made before `spectral` existed stay valid
        del params["method"], params["neighbours"]
    return {**params, "seed": cfg.seed}


def run(ctx: Context, params: Params) -> dict:
    vectors = np.ascontiguousarray(np.load(ctx.upstream["embed"] / "embeddings.npy"), dtype=np.float32)
    if len(vectors) < params.k:
        raise InputError(f"cluster.k={params.k} but only {len(vectors)} objects were found; lower cluster.k "
                         f"or lower objects.min_area")
    started = time.perf_counter()
    centroids, assignment, distance = METHODS[params.method](vectors, params, ctx.cfg.seed)
    core = core_mask(assignment, distance, params.k, params.core_fraction)
    np.save(ctx.out / "centroids.npy", centroids)
    np.save(ctx.out / "assignments.npy", assignment)
    np.save(ctx.out / "distances.npy", distance)
    np.save(ctx.out / "core.npy", core)
    sizes = np.bincount(assignment, minlength=params.k)
    return {"objects": len(vectors), "core_objects": int(core.sum()), "cluster_sizes": sizes.tolist(),
            f"{params.method}_seconds": round(time.perf_counter() - started, 3)}


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


def spectral(vectors: np.ndarray, params: Params, seed: int):
    """Spectral clustering as scikit-learn's `SpectralClustering(affinity="nearest_neighbors")` does it,
    with faiss for the neighbour search and the k-means: leading eigenvectors of the normalised graph,
    scaled by the inverse square root of each object's degree, grouped by k-means from k-means++ seeds.
    Returns what `spherical_kmeans` returns, with each centroid the normalised mean of its members."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    graph = neighbour_graph(unit, min(params.neighbours, len(unit)))
    inverse_sqrt_degree = 1.0 / np.sqrt(np.asarray(graph.sum(axis=1)).ravel())
    normalised = scipy.sparse.diags(inverse_sqrt_degree) @ graph @ scipy.sparse.diags(inverse_sqrt_degree)
    start = np.random.default_rng(seed).uniform(-1.0, 1.0, len(unit))  # ARPACK's start vector, seeded
    if params.k < len(unit):
        _, eigenvectors = scipy.sparse.linalg.eigsh(normalised, k=params.k, which="LA", v0=start)
    else:  # ARPACK needs k < n; a dense solve is cheap at this size
        eigenvectors = np.linalg.eigh(normalised.toarray())[1][:, -params.k:]
    assignment = kmeans_plus_plus(np.ascontiguousarray(eigenvectors * inverse_sqrt_degree[:, None], dtype=np.float32),
                                  params, seed)
    sums = np.zeros((params.k, unit.shape[1]), dtype=np.float64)
    np.add.at(sums, assignment, unit)
    centroids = (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    distance = (1.0 - np.einsum("nd,nd->n", unit, centroids[assignment])).astype(np.float32)
    return centroids, assignment, distance


def kmeans_plus_plus(points: np.ndarray, params: Params, seed: int) -> np.ndarray:
    """Euclidean faiss k-means from scikit-learn's k-means++ seeds, the lowest-inertia of `nredo`
    restarts; (n,) int32 assignment. faiss's own random seeds land badly on spectral embeddings
    (VOC-330 purity 0.669 vs 0.705), and scikit-learn's KMeans would run on torch's OpenMP runtime,
    whose spinning threads made it 7x slower on a busy machine (see pipeline/faiss_runtime.py)."""
    from sklearn.cluster import kmeans_plusplus  # imported here: only this method needs it

    best_inertia, best = np.inf, None
    for restart in range(params.nredo):
        kmeans = faiss.Kmeans(points.shape[1], params.k, niter=params.niter, seed=seed + restart,
                              max_points_per_centroid=params.max_points_per_centroid, min_points_per_centroid=1)
        kmeans.train(points, init_centroids=kmeans_plusplus(points, params.k, random_state=seed + restart)[0])
        squared_distance, nearest = kmeans.index.search(points, 1)
        inertia = squared_distance.sum()
        if inertia < best_inertia:
            best_inertia, best = inertia, nearest[:, 0].astype(np.int32)
    return best


def neighbour_graph(unit: np.ndarray, neighbours: int) -> scipy.sparse.csr_matrix:
    """Symmetric kNN connectivity (0.5 one way, 1 both ways) by cosine similarity, each object
    counted among its own neighbours, as scikit-learn's `kneighbors_graph(include_self=True)`."""
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    nearest = index.search(unit, neighbours)[1]
    rows = np.repeat(np.arange(len(unit)), neighbours)
    connectivity = scipy.sparse.csr_matrix((np.ones(rows.size), (rows, nearest.ravel())), shape=(len(unit),) * 2)
    return (connectivity + connectivity.T) * 0.5


METHODS = {"kmeans": spherical_kmeans, "spectral": spectral}


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
