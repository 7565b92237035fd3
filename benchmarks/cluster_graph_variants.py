"""Variants of the spectral clustering's graph, each scored as the pseudo masks it would paint, in milliseconds.

    python3 benchmarks/cluster_graph_variants.py --workdir WD --labels LABELDIR [--k 20] [--seeds 0 1 2]
                                                 [--rows neighbours averaged same-image mutual weighted eigenvectors assignment]
                                                 [--subsets N [--fraction 0.8]]

WD is a finished run up to the pseudo masks (its embed entry and object maps are read, nothing is
written). Each object's ground-truth pixel histogram is counted once; an assignment then gives the
confusion that the pseudo_masks stage and `evaluate` would (background 0, object pixels cluster + 1,
salient pixels of no object 255, counted as wrong), so a variant costs a clustering, not 330 PNGs. On
VOC-330 the `neighbours 10` row, seed 0, is `evaluate`'s figure for the default pseudo masks (0.4108).
A / B: the photos whose name's sha256 is even / odd, as in pseudo_label_ablation.py. With `--subsets N`,
each row is scored instead on N random subsets of the photos (80% each), clustered on their own, with
its mean difference from the default graph's on the same subsets.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
from pathlib import Path

import numpy as np
import scipy.sparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from commands.evaluate import VOC_CLASSES, label_files, scores  # noqa: E402
from pipeline.artifacts import read_json  # noqa: E402
from pipeline.images import read_label_png  # noqa: E402
from pipeline.outputs import IGNORE, ITEMS, embedding_rows, load_embeddings, load_objects, object_file  # noqa: E402
from pipeline.runner import Workdir  # noqa: E402
from pipeline.faiss_runtime import faiss  # noqa: E402
from stages import cluster  # noqa: E402

DEFAULT_ROW = "neighbours 10 + same-photo edges x1.0"  # the stage's graph with its default parameters
ASSIGNMENTS = ("unit rows", "discretize", "cluster_qr", "neighbour vote", "k-means from its centroids")


@dataclasses.dataclass(frozen=True)
class Histograms:
    """Ground-truth pixel counts (256 bins): per object, and per photo for its background and for its
    salient pixels that belong to no embedded object; the photo of each object; the photos' names."""
    objects: np.ndarray
    background: np.ndarray
    unclaimed: np.ndarray
    photo_of_object: np.ndarray
    names: list[str]


def histograms(workdir: Path, labels_dir: Path) -> Histograms:
    wd = Workdir(workdir)
    entry = wd.latest_entry("embed")
    items = read_json(entry / ITEMS)
    photo_of_object, object_id = embedding_rows(entry)
    labels = label_files(labels_dir, [i["image"] for i in items])
    objects = np.zeros((len(photo_of_object), 256), np.int64)
    background, unclaimed = np.zeros((2, len(items), 256), np.int64)
    for photo, item in enumerate(items):
        object_map = load_objects(object_file(wd.store, item["objects_key"]))[0]
        truth = read_label_png(labels[item["image"]])
        claimed = object_map == 0
        for row in np.flatnonzero(photo_of_object == photo):
            pixels = object_map == object_id[row]
            objects[row] = np.bincount(truth[pixels], minlength=256)
            claimed |= pixels
        background[photo] = np.bincount(truth[object_map == 0], minlength=256)
        unclaimed[photo] = np.bincount(truth[~claimed], minlength=256)
    return Histograms(objects, background, unclaimed, photo_of_object, [i["image"] for i in items])


def miou(assignment: np.ndarray, counts: Histograms, k: int, photos: np.ndarray) -> float:
    """Hungarian mIoU of the pseudo masks `assignment` paints, on the chosen photos (a boolean mask)."""
    confusion = np.zeros((256, 256), np.int64)
    confusion[0] = counts.background[photos].sum(axis=0)
    confusion[IGNORE] = counts.unclaimed[photos].sum(axis=0)
    rows = photos[counts.photo_of_object]
    np.add.at(confusion, assignment[rows] + 1, counts.objects[rows])
    confusion[:, IGNORE] = 0  # unlabelled ground-truth pixels are not scored
    return scores(confusion, k + 1, VOC_CLASSES)["hungarian"]["miou"]


def partition(graph: scipy.sparse.spmatrix, params: cluster.Params, seed: int, eigenvectors: int = 0) -> np.ndarray:
    """The stage's partition of `graph` (its `k` leading eigenvectors), or of `eigenvectors` of them."""
    if not eigenvectors:
        return cluster.graph_partition(graph.tocsr(), params, seed)
    leading, inverse_sqrt_degree = leading_eigenvectors(graph, eigenvectors)
    return cluster.kmeans_plus_plus(np.ascontiguousarray(leading * inverse_sqrt_degree[:, None], dtype=np.float32),
                                    params, seed)


def leading_eigenvectors(graph: scipy.sparse.spmatrix, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(the `count` leading eigenvectors of the graph's normalised affinity, each node's degree ** -0.5)."""
    inverse_sqrt_degree = 1.0 / np.sqrt(np.asarray(graph.sum(axis=1)).ravel())
    normalised = scipy.sparse.diags(inverse_sqrt_degree) @ graph @ scipy.sparse.diags(inverse_sqrt_degree)
    return np.linalg.eigh(normalised.toarray())[1][:, -count:], inverse_sqrt_degree


def relabelled(graph: scipy.sparse.spmatrix, params: cluster.Params, seed: int, how: str, unit: np.ndarray) -> np.ndarray:
    """The default graph's objects grouped another way: k-means on the eigenvector rows normalised to unit
    length (Ng, Jordan and Weiss), scikit-learn's `discretize` or `cluster_qr` label assignment, or the
    stage's partition followed by one vote of each object's graph neighbours or by spherical k-means on
    the vectors from its clusters' centroids."""
    from sklearn.cluster._spectral import cluster_qr, discretize

    leading, inverse_sqrt_degree = leading_eigenvectors(graph, params.k)
    if how == "unit rows":
        rows = leading / np.linalg.norm(leading, axis=1, keepdims=True)
        return cluster.kmeans_plus_plus(np.ascontiguousarray(rows, dtype=np.float32), params, seed)
    if how == "discretize":
        return discretize(leading * inverse_sqrt_degree[:, None], random_state=seed).astype(np.int32)
    if how == "cluster_qr":
        return cluster_qr(leading * inverse_sqrt_degree[:, None]).astype(np.int32)
    assignment = cluster.graph_partition(graph.tocsr(), params, seed)
    if how == "neighbour vote":
        members = scipy.sparse.csr_matrix((np.ones(len(unit)), (np.arange(len(unit)), assignment)), shape=(len(unit), params.k))
        return np.asarray((graph @ members).toarray() + 1e-3 * members.toarray()).argmax(axis=1).astype(np.int32)
    centroids = cluster.members_centroids(unit, assignment, params.k)[0]
    kmeans = faiss.Kmeans(unit.shape[1], params.k, niter=20, spherical=True, min_points_per_centroid=1)
    kmeans.train(unit, init_centroids=centroids)
    return kmeans.index.search(unit, 1)[1][:, 0].astype(np.int32)


def variants(unit: np.ndarray, photo_of_object: np.ndarray, rows: list[str]) -> dict[str, tuple]:
    """name -> (graph, eigenvectors) for the chosen row families."""
    graph = {n: cluster.neighbour_graph(unit, n) for n in (5, 8, 10, 12, 15, 20, 30)}
    chosen = {}
    if "neighbours" in rows:
        chosen |= {f"neighbours {n}": (g, 0) for n, g in graph.items()}
    if "averaged" in rows:  # one graph from several neighbour counts, against the count's spikes
        for counts in ((8, 10, 12), (5, 10, 20), (10, 15, 20, 30), (5, 10, 15, 20, 30)):
            chosen[f"averaged graphs {counts}"] = (sum(graph[n] for n in counts) / len(counts), 0)
    if "same-image" in rows:  # objects of one photo are often one class (a herd, a crowd)
        same = cluster.same_photo_graph(photo_of_object)
        for n in (10, 20, 30):
            chosen |= {f"neighbours {n} + same-photo edges x{w}": (graph[n] + w * same, 0) for w in (0.25, 0.5, 1.0)}
    if "mutual" in rows:  # only the edges both objects chose
        for n in (10, 15, 20, 30):
            mutual = graph[n].copy()
            mutual.data = (mutual.data >= 1).astype(float)
            chosen[f"mutual neighbours {n}"] = (mutual, 0)
    if "weighted" in rows:  # edges weighted by cosine similarity
        similarity = np.maximum(unit @ unit.T, 0)
        chosen |= {f"cosine-weighted neighbours {n}": (graph[n].multiply(similarity), 0) for n in (10, 20, 30)}
    if "assignment" in rows:  # the default graph (10 neighbours + same-photo edges), its groups found otherwise
        default = graph[10] + cluster.same_photo_graph(photo_of_object)
        chosen |= {f"default graph, {how}": (default, how) for how in ASSIGNMENTS}
    if "eigenvectors" in rows:  # k-means on more eigenvectors than k
        for n in (10, 20, 30):
            chosen |= {f"neighbours {n}, {e} eigenvectors": (graph[n], e) for e in (25, 30, 40)}
    return chosen


def subset_scores(unit: np.ndarray, counts: Histograms, rows: list[str], params: cluster.Params, seed: int,
                  subsets: int, fraction: float) -> dict[str, np.ndarray]:
    """Each row's mIoU on `subsets` random subsets of the photos (each kept with probability `fraction`,
    the same subsets for every row and run), clustered on the subset's objects alone: how a variant does
    on photo sets like this one, rather than on this one, whose score a few discrete outcomes decide."""
    generator, scored = np.random.default_rng(0), {}
    for _ in range(subsets):
        photos = generator.random(len(counts.names)) < fraction
        kept = photos[counts.photo_of_object]
        subset = dataclasses.replace(counts, objects=counts.objects[kept], photo_of_object=counts.photo_of_object[kept])
        for name, (graph, eigenvectors) in variants(unit[kept], subset.photo_of_object, rows).items():
            assignment = relabelled(graph, params, seed, eigenvectors, unit[kept]) if eigenvectors in ASSIGNMENTS \
                else partition(graph, params, seed, eigenvectors)
            scored.setdefault(name, []).append(miou(assignment, subset, params.k, photos))
    return {name: np.array(values) for name, values in scored.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=["neighbours", "averaged", "same-image", "mutual", "weighted",
                                                      "eigenvectors", "assignment"])
    parser.add_argument("--subsets", type=int, default=0,
                        help="score each row on this many random photo subsets instead, clustered alone (first seed)")
    parser.add_argument("--fraction", type=float, default=0.8, help="of the photos each subset keeps, on average")
    args = parser.parse_args()
    counts = histograms(args.workdir, args.labels)
    unit = cluster._unit(load_embeddings(Workdir(args.workdir).latest_entry("embed")))  # as the stage's spectral
    params = cluster.Params(k=args.k)
    if args.subsets:
        scored = subset_scores(unit, counts, args.rows, params, args.seeds[0], args.subsets, args.fraction)
        reference = scored.get(DEFAULT_ROW)
        for name, values in scored.items():
            paired = "" if reference is None else (f"  against the default {np.mean(values - reference):+.4f}"
                                                   f" (standard error {np.std(values - reference) / np.sqrt(len(values)):.4f})")
            print(f"{name:44s} mIoU {np.mean(values):.4f} (sd {np.std(values):.4f}){paired}", flush=True)
        return
    everything = np.ones(len(counts.names), bool)
    half_a = np.array([int(hashlib.sha256(name.encode()).hexdigest(), 16) % 2 == 0 for name in counts.names])
    for name, (graph, eigenvectors) in variants(unit, counts.photo_of_object, args.rows).items():
        runs = [relabelled(graph, params, seed, eigenvectors, unit) if eigenvectors in ASSIGNMENTS
                else partition(graph, params, seed, eigenvectors) for seed in args.seeds]
        scored = [[miou(a, counts, args.k, photos) for a in runs] for photos in (everything, half_a, ~half_a)]
        print(f"{name:44s} mIoU {np.mean(scored[0]):.3f} ({min(scored[0]):.3f}-{max(scored[0]):.3f})"
              f"  A {np.mean(scored[1]):.3f}  B {np.mean(scored[2]):.3f}", flush=True)


if __name__ == "__main__":
    main()
