"""Cluster: the L2-normalised object vectors are grouped into `k` pseudo-classes.

The vectors may first be projected on their `pca_dim` principal components (faiss's PCAMatrix),
`whiten`ed to unit variance per component so that the few directions every object shares (what
makes a photo a photo) stop dominating the cosine, and normalised again.

`kmeans`: faiss's spherical k-means (centroids re-normalised each iteration), seeded, best of
`nredo` restarts; scales to 10^6 objects. `spectral` (the COMUS paper's choice): spectral clustering
of the symmetric `neighbours`-nearest-neighbour graph, built with faiss's exact search (its cost grows
with the square of the object count), then k-means on the graph's leading eigenvectors; it follows
elongated clusters that k-means cuts in pieces; `same_photo` > 0 adds edges of that weight between
the objects of one photo, since a photo's objects are often of one class (a crowd, a herd, a parked
row of cars) and its salient mask often breaks one object into pieces. `auto`: spectral up to `SPECTRAL_MAX_OBJECTS`,
k-means beyond. With `overcluster` > 1, the method makes `overcluster` x k clusters, and those that
share the most neighbour-graph edges, for their size, are merged until k remain.

Objects whose label is least reliable become ignore (255 in the masks): per cluster, all but the
`core_fraction` most reliable, ranked by `reliability`: `distance` to the cluster's centroid, or
`neighbours`: the share of an object's graph neighbours that carry its label (ties by distance).
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
from pipeline.outputs import Clusters, embedding_rows, load_embeddings, save_clusters

VERSION = 3  # 3 (2 was never released): dense eigen-solve up to DENSE_EIGEN_MAX objects (ARPACK was not repeatable on repeated eigenvalues); PCA keeps only spanned components
SPANNED = 1e-6  # a principal component with less than this share of the first one's variance is not spanned
DENSE_EIGEN_MAX = 2000  # objects up to which the graph's eigenvectors come from a dense solve (32 MB, ~1 s)
MAX_K = 254  # mask values: 0 background, 1..k clusters, 255 ignore
# Spectral's exact kNN graph costs n^2: 1.9 s at 10^4 objects and 81 s at 10^5 (benchmarks/clustering.py),
# still a small part of embedding that many crops (about an hour for 10^5 here); 10^6 would take hours.
SPECTRAL_MAX_OBJECTS = 100_000
RELIABILITY = ("distance", "neighbours")


@dataclasses.dataclass(frozen=True)
class Params:
    k: int = 20
    method: str = "auto"  # auto | kmeans | spectral
    # graph neighbours of each object (itself included): spectral, merging, reliability. 10 is scikit-learn's
    # SpectralClustering default; on VOC-330 it also beat 5, 15, 20 and 30 (README, "Pseudo labels")
    neighbours: int = 10
    # spectral: weight of the edges between objects of one photo (a kNN edge weighs 0.5 one way, 1 both ways)
    same_photo: float = 1.0
    pca_dim: int = 0  # project on this many principal components first, as Leopart does (0: no projection)
    whiten: bool = False  # each principal component scaled to unit variance (only with pca_dim)
    overcluster: int = 1  # make this many times k clusters, then merge them to k
    reliability: str = "distance"  # what ranks a cluster's objects for core_fraction: distance | neighbours
    niter: int = 300
    nredo: int = 10
    core_fraction: float = 1.0  # per cluster, this fraction of the most reliable objects keep their label
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
        if self.same_photo < 0:
            raise ConfigError(f"same_photo must be >= 0, got {self.same_photo}")
        if self.pca_dim < 0:
            raise ConfigError(f"pca_dim must be >= 0, got {self.pca_dim}")
        if not 1 <= self.overcluster <= MAX_K // self.k:
            raise ConfigError(f"overcluster must be in [1, {MAX_K // self.k}] for k={self.k}, got {self.overcluster}")
        if self.reliability not in RELIABILITY:
            raise ConfigError(f"reliability must be one of {', '.join(RELIABILITY)}, got {self.reliability!r}")


def key_params(cfg) -> dict:
    # settings at what version 1 did are left out, so keys made before they existed stay valid
    params = dataclasses.asdict(cfg.cluster)
    legacy = {"pca_dim": 0, "whiten": False, "overcluster": 1, "reliability": "distance", "same_photo": 0.0}
    if not params["pca_dim"]:  # whitening is part of the projection
        params["whiten"] = False
    params = {name: value for name, value in params.items() if legacy.get(name, object()) != value}
    if params["method"] == "kmeans":  # k-means keys made before `spectral` existed stay valid
        del params["method"]
        params.pop("same_photo", None)  # k-means has no graph
        if not ({"overcluster", "reliability"} & set(params)):
            del params["neighbours"]
    return {**params, "seed": cfg.seed}


def check_counts(params: Params, counts: dict[str, dict]) -> None:
    """Stop as soon as the object count is known (after the objects stage, before embedding) if it is below k."""
    found = counts.get("objects", {}).get("objects")
    if found is not None and found < params.k:
        raise InputError(f"cluster.k={params.k} but only {found} objects were found in "
                         f"{counts['objects'].get('images')} images; lower cluster.k or objects.min_area")


def run(ctx: Context, params: Params) -> dict:
    vectors = np.ascontiguousarray(load_embeddings(ctx.upstream["embed"]), dtype=np.float32)
    photos = embedding_rows(ctx.upstream["embed"])[0]
    if len(vectors) < params.k:
        raise InputError(f"cluster.k={params.k} but only {len(vectors)} objects were found; lower cluster.k "
                         f"or lower objects.min_area")
    started = time.perf_counter()
    method = resolved_method(params.method, len(vectors))
    unit = projected(vectors, params)
    centroids, assignment, distance = clustered(unit, params, ctx.cfg.seed, photos)
    core = core_mask(assignment, unreliability(unit, assignment, distance, params), params.k, params.core_fraction)
    save_clusters(ctx.out, centroids, Clusters(assignment, distance, core))
    sizes = np.bincount(assignment, minlength=params.k)
    return {"objects": len(vectors), "method": method, "core_objects": int(core.sum()), "cluster_sizes": sizes.tolist(),
            f"{method}_seconds": round(time.perf_counter() - started, 3)}


def resolved_method(method: str, objects: int) -> str:
    if method != "auto":
        return method
    return "spectral" if objects <= SPECTRAL_MAX_OBJECTS else "kmeans"


def projected(vectors: np.ndarray, params: Params) -> np.ndarray:
    """The vectors on their `pca_dim` principal components (whitened with `whiten`), L2-normalised;
    unchanged without pca_dim. Only components the vectors really span are kept (at most n - 1, fewer
    when objects repeat): whitening one of variance ~0 would divide by ~0 and fill the vectors with NaN."""
    dim = min(params.pca_dim, vectors.shape[1], len(vectors) - 1)
    if dim < 1:
        return vectors
    pca = faiss.PCAMatrix(vectors.shape[1], dim, 0.0, False)
    pca.train(vectors)
    variance = faiss.vector_to_array(pca.eigenvalues)[:dim]
    spanned = int((variance > SPANNED * variance[0]).sum()) if variance[0] > 0 else 0
    if spanned < 1:  # every vector the same: nothing to project
        return vectors
    if spanned < dim or params.whiten:
        pca = faiss.PCAMatrix(vectors.shape[1], spanned, -0.5 if params.whiten else 0.0, False)
        pca.train(vectors)
    return _unit(pca.apply(vectors))


def clustered(unit: np.ndarray, params: Params, seed: int, photos: np.ndarray | None = None):
    """What the method returns for the vectors (`photos`: each one's photo), after over-clustering and
    merging when `overcluster` > 1."""
    method = METHODS[resolved_method(params.method, len(unit))]
    if params.overcluster == 1:
        return method(unit, params, seed, photos)
    fine = dataclasses.replace(params, k=min(params.k * params.overcluster, len(unit)), overcluster=1)
    assignment = merged(unit, method(unit, fine, seed, photos)[1], params, seed)
    return members_centroids(unit, assignment, params.k)


def merged(unit: np.ndarray, assignment: np.ndarray, params: Params, seed: int) -> np.ndarray:
    """Clusters merged into k by a normalised cut of the graph between them, whose edge weights are the
    neighbour-graph edges from one cluster's objects to the other's."""
    graph = neighbour_graph(unit, min(params.neighbours, len(unit)))
    membership = scipy.sparse.csr_matrix((np.ones(len(unit)), (np.arange(len(unit)), assignment)),
                                         shape=(len(unit), int(assignment.max()) + 1))
    return graph_partition((membership.T @ graph @ membership).tocsr(), params, seed)[assignment]


def members_centroids(unit: np.ndarray, assignment: np.ndarray, k: int):
    """(centroids: each cluster's normalised mean, assignment, cosine distance to its centroid)."""
    sums = np.zeros((k, unit.shape[1]), dtype=np.float64)
    np.add.at(sums, assignment, unit)
    centroids = _unit(sums).astype(np.float32)
    distance = (1.0 - np.einsum("nd,nd->n", unit, centroids[assignment])).astype(np.float32)
    return centroids, assignment, distance


def unreliability(unit: np.ndarray, assignment: np.ndarray, distance: np.ndarray, params: Params) -> np.ndarray:
    """Per object, lower is more reliable: its distance, or its rank by (share of its graph neighbours,
    itself left out, that carry another label; distance)."""
    if params.reliability == "distance":
        return distance
    neighbours = min(params.neighbours, len(unit))
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    nearest = index.search(unit, neighbours)[1]
    others = nearest[nearest != np.arange(len(unit))[:, None]].reshape(len(unit), -1)[:, :neighbours - 1]
    disagreement = (assignment[others] != assignment[:, None]).mean(axis=1)
    order = np.lexsort((distance, disagreement))
    rank = np.empty(len(unit), np.float32)
    rank[order] = np.arange(len(unit))
    return rank


def spherical_kmeans(vectors: np.ndarray, params: Params, seed: int, photos: np.ndarray | None = None):
    """(centroids (k, d), assignment (n,) int32, cosine distance to the assigned centroid (n,) float32);
    `photos` is not used: k-means has no graph to join a photo's objects in."""
    kmeans = faiss.Kmeans(vectors.shape[1], params.k, niter=params.niter, nredo=params.nredo, seed=seed,
                          spherical=True, max_points_per_centroid=params.max_points_per_centroid,
                          min_points_per_centroid=1, verbose=False)
    kmeans.train(vectors)
    centroids = kmeans.centroids / np.maximum(np.linalg.norm(kmeans.centroids, axis=1, keepdims=True), 1e-12)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(centroids.astype(np.float32))
    similarity, nearest = index.search(vectors, 1)
    return centroids.astype(np.float32), nearest[:, 0].astype(np.int32), (1.0 - similarity[:, 0]).astype(np.float32)


def spectral(vectors: np.ndarray, params: Params, seed: int, photos: np.ndarray | None = None):
    """Spectral clustering as scikit-learn's `SpectralClustering(affinity="nearest_neighbors")` does it,
    with faiss for the neighbour search and the k-means: leading eigenvectors of the normalised graph,
    scaled by the inverse square root of each object's degree, grouped by k-means from k-means++ seeds.
    Returns what `spherical_kmeans` returns, with each centroid the normalised mean of its members."""
    unit = _unit(vectors)
    graph = neighbour_graph(unit, min(params.neighbours, len(unit)))
    if params.same_photo and photos is not None:
        graph = graph + params.same_photo * same_photo_graph(photos)
    return members_centroids(unit, graph_partition(graph, params, seed), params.k)


def same_photo_graph(photos: np.ndarray) -> scipy.sparse.csr_matrix:
    """1 between every two objects of one photo (`photos`: each object's photo index), 0 elsewhere."""
    member = scipy.sparse.csr_matrix((np.ones(len(photos)), (np.arange(len(photos)), photos)))
    same = (member @ member.T).tocsr()
    same.setdiag(0)
    same.eliminate_zeros()
    return same


def graph_partition(graph: scipy.sparse.csr_matrix, params: Params, seed: int) -> np.ndarray:
    """(n,) int32: the graph's nodes in k groups, from the leading eigenvectors of its normalised affinity."""
    nodes = graph.shape[0]
    inverse_sqrt_degree = 1.0 / np.sqrt(np.asarray(graph.sum(axis=1)).ravel())
    normalised = scipy.sparse.diags(inverse_sqrt_degree) @ graph @ scipy.sparse.diags(inverse_sqrt_degree)
    if nodes <= DENSE_EIGEN_MAX or params.k >= nodes:
        # LAPACK's dense solve returns the same vectors every time, even for a repeated eigenvalue (a graph
        # as dense as complete, on a few objects), where ARPACK's Lanczos run picks another basis each call
        eigenvectors = np.linalg.eigh(normalised.toarray())[1][:, -params.k:]
    else:
        start = np.random.default_rng(seed).uniform(-1.0, 1.0, nodes)  # ARPACK's start vector, seeded
        _, eigenvectors = scipy.sparse.linalg.eigsh(normalised, k=params.k, which="LA", v0=start)
    return kmeans_plus_plus(np.ascontiguousarray(eigenvectors * inverse_sqrt_degree[:, None], dtype=np.float32),
                            params, seed)


def _unit(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12), dtype=np.float32)


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


def auto(vectors: np.ndarray, params: Params, seed: int, photos: np.ndarray | None = None):
    """spectral up to SPECTRAL_MAX_OBJECTS objects, spherical k-means beyond."""
    return METHODS[resolved_method("auto", len(vectors))](vectors, params, seed, photos)


METHODS = {"auto": auto, "kmeans": spherical_kmeans, "spectral": spectral}


def core_mask(assignment: np.ndarray, distance: np.ndarray, k: int, core_fraction: float) -> np.ndarray:
    """True for objects within their cluster's `core_fraction` quantile of `distance` (or of any score
    where lower is more reliable)."""
    core = np.ones(len(assignment), dtype=bool)
    if core_fraction >= 1.0:
        return core
    for cluster_id in range(k):
        members = np.flatnonzero(assignment == cluster_id)
        if len(members):
            limit = np.quantile(distance[members], core_fraction, method="higher")
            core[members] = distance[members] <= limit
    return core
