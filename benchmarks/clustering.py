"""Clustering benchmark: the pipeline's two methods (faiss k-means, spectral on a faiss kNN graph) against
scikit-learn's spectral clustering (COMUS's choice) and scikit-learn KMeans.

    python benchmarks/clustering.py [--workdir WD [--labels LABELDIR]] [--synthetic 10000 100000 1000000] [--k 20]
                                    [--spectral-max 20000] [--faiss-spectral-max 100000]
                                    [--sklearn-kmeans-max 100000] [--noise 4.0] [--seed 0] [--pca-dim N [--whiten]]

Datasets: the object embeddings of a finished run's embed entry (--workdir), each object's true class
the majority ground-truth class (0 and 255 left out) of its pixels in --labels (objects without one
are clustered but left out of the scores); and synthetic L2-normalised 384-D float32 vectors, a
mixture of k clusters around random unit centres (Dirichlet(1) sizes, Gaussian noise of norm about
--noise), written in chunks. Methods, all with --k clusters and --seed:
  faiss           `stages.cluster.spherical_kmeans` (`cluster.method=kmeans`) with the cluster stage's
                  default Params (niter 300, nredo 10, max_points_per_centroid 256: larger sets are
                  subsampled for training, then all assigned)
  faiss-spectral  `stages.cluster.spectral` (`cluster.method=spectral`): the same algorithm as `spectral`,
                  with faiss's exact 30-NN search and ARPACK on the normalised graph
  kmeans          sklearn KMeans, n_init = nredo, max_iter = niter, on every point
  spectral        sklearn SpectralClustering on the 30-NN connectivity graph, k-means label assignment
(`cluster.method=auto` is faiss-spectral up to `stages.cluster.SPECTRAL_MAX_OBJECTS`, faiss beyond.)
With --pca-dim (and --whiten), every method clusters the vectors as the cluster stage projects them
(`stages.cluster.projected`, timed with the clustering).
Each measurement is a fresh process (this script with --one) that imports the pipeline (torch
included, as the cluster stage has it), loads the vectors, then clusters: seconds are the
clustering alone; peak RSS is the process's high-water mark (Linux's VmHWM), and "+GiB" its growth
over the mark with the vectors loaded. Purity (each cluster counts its majority class) and NMI are
against the known classes. Prints a table, then for each of faiss and faiss-spectral
time(spectral)/time(it) (goal >= 20) and purity(it) - purity(spectral) (goal >= 0), and whether faiss
on 10^6 objects stays within 24 GiB.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages import cluster  # noqa: E402

DIM = 384
CHUNK = 100_000  # synthetic rows generated at a time
GIB = 2 ** 30
MEMORY_GOAL_GIB = 24
SPEEDUP_GOAL = 20


def faiss_kmeans(vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
    return cluster.spherical_kmeans(vectors, cluster.Params(k=k), seed)[1]


def sklearn_kmeans(vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
    params = cluster.Params(k=k)
    return KMeans(k, n_init=params.nredo, max_iter=params.niter, random_state=seed).fit_predict(vectors)


def spectral(vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
    return SpectralClustering(k, affinity="nearest_neighbors", n_neighbors=30, assign_labels="kmeans",
                              random_state=seed).fit_predict(vectors)


def faiss_spectral(vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
    return cluster.spectral(vectors, cluster.Params(k=k, method="spectral"), seed)[1]


METHODS = {"faiss": faiss_kmeans, "faiss-spectral": faiss_spectral, "kmeans": sklearn_kmeans, "spectral": spectral}


def peak_rss_gib() -> float:
    """This process's peak resident memory so far: VmHWM, not getrusage's ru_maxrss, which on Linux
    carries the forking parent's peak over into the child."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024 / GIB  # kB


def measure_one(method: str, vectors_path: str, assignment_path: str, k: int, seed: int, pca_dim: int = 0,
                whiten: bool = False) -> None:
    """Child process: load, (project,) cluster, save the assignment, print seconds and RSS as JSON."""
    vectors = np.ascontiguousarray(np.load(vectors_path), dtype=np.float32)  # as the cluster stage loads them
    loaded = peak_rss_gib()
    started = time.perf_counter()
    vectors = cluster.projected(vectors, cluster.Params(k=k, pca_dim=pca_dim, whiten=whiten))
    assignment = METHODS[method](vectors, k, seed)
    seconds = time.perf_counter() - started
    np.save(assignment_path, np.asarray(assignment, dtype=np.int32))
    print(json.dumps({"seconds": seconds, "loaded_gib": loaded, "peak_gib": peak_rss_gib()}))


def measure(method: str, vectors_path: Path, scratch: Path, args) -> tuple[dict, np.ndarray]:
    """(seconds and RSS, assignment) of `method` on the vectors, from a fresh child process."""
    assignment_path = scratch / "assignment.npy"
    out = subprocess.run([sys.executable, __file__, "--one", method, str(vectors_path), str(assignment_path),
                          "--k", str(args.k), "--seed", str(args.seed), "--pca-dim", str(args.pca_dim),
                          *(["--whiten"] if args.whiten else [])],
                         check=True, stdout=subprocess.PIPE, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1]), np.load(assignment_path)


def scores(truth: np.ndarray, assignment: np.ndarray) -> tuple[float, float] | None:
    """(purity, NMI) over the objects whose class is known (truth >= 0), None when there are none."""
    known = truth >= 0
    if not known.any():
        return None
    truth, assignment = truth[known], assignment[known]
    purity = contingency_matrix(truth, assignment).max(axis=0).sum() / len(truth)
    return float(purity), float(normalized_mutual_info_score(truth, assignment))


def synthetic(path: Path, n: int, k: int, noise: float, seed: int) -> np.ndarray:
    """Write n unit vectors around k random unit centres to `path` (.npy); return their true classes."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.choice(k, size=n, p=rng.dirichlet(np.ones(k)))
    vectors = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, DIM))
    for start in range(0, n, CHUNK):
        classes = truth[start:start + CHUNK]
        part = centres[classes] + noise / np.sqrt(DIM) * rng.standard_normal((len(classes), DIM))
        vectors[start:start + len(classes)] = part / np.linalg.norm(part, axis=1, keepdims=True)
    vectors.flush()
    return truth


def real(workdir: Path, labels_dir: Path | None) -> tuple[Path, np.ndarray]:
    """(embeddings.npy of the run's embed entry, each object's majority ground-truth class or -1)."""
    # imported here, not at the top, so that the measured child processes do not load them
    from commands.evaluate import label_files
    from pipeline.artifacts import read_json
    from pipeline.images import read_label_png
    from pipeline.outputs import IGNORE, ITEMS, load_objects, object_file
    from pipeline.runner import Workdir

    wd = Workdir(workdir)
    entry = wd.latest_entry("embed")
    items = read_json(entry / ITEMS)
    with np.load(entry / "objects.npz") as rows:
        image_index, object_id = rows["image_index"], rows["object_id"]
    truth = np.full(len(image_index), -1)
    labels = label_files(labels_dir, [i["image"] for i in items]) if labels_dir else {}
    for position, item in enumerate(items):
        object_rows = np.flatnonzero(image_index == position)
        if item["image"] not in labels or not len(object_rows):
            continue
        object_map = load_objects(object_file(wd.store, item["objects_key"]))[0]
        label = read_label_png(labels[item["image"]])
        if label.shape != object_map.shape:
            raise SystemExit(f"{labels[item['image']]} is {label.shape[::-1]} but its image's object map is {object_map.shape[::-1]}")
        for row in object_rows:
            classes = label[(object_map == object_id[row]) & (label != 0) & (label != IGNORE)]
            if len(classes):
                truth[row] = np.bincount(classes).argmax()
    return entry / "embeddings.npy", truth


def run_dataset(name: str, vectors_path: Path, truth: np.ndarray, scratch: Path, args) -> dict[str, dict]:
    """Measure every method within its size limit; print a row each; return the rows by method."""
    n = len(truth)
    limits = {"spectral": ("--spectral-max", args.spectral_max), "kmeans": ("--sklearn-kmeans-max", args.sklearn_kmeans_max),
              "faiss-spectral": ("--faiss-spectral-max", args.faiss_spectral_max)}
    results = {}
    for method in METHODS:
        if method in limits and n > limits[method][1]:
            print(f"{name:18s} {n:8d} {method:14s} skipped (size {n} > {' '.join(map(str, limits[method]))})", flush=True)
            continue
        result, assignment = measure(method, vectors_path, scratch, args)
        result["scores"] = scores(truth, assignment)
        purity, nmi = (f"{s:7.3f}" for s in result["scores"]) if result["scores"] else ("    n/a",) * 2
        print(f"{name:18s} {n:8d} {method:14s} {result['seconds']:9.2f} {result['peak_gib']:9.2f} "
              f"{result['peak_gib'] - result['loaded_gib']:7.2f} {purity} {nmi}", flush=True)
        results[method] = result
    return results


def print_ratios(name: str, n: int, results: dict[str, dict]) -> None:
    other = results.get("spectral")
    for method in ("faiss", "faiss-spectral"):
        ours = results.get(method)
        if not (ours and other):
            continue
        speedup = other["seconds"] / ours["seconds"]
        line = f"{name}: time(spectral)/time({method}) = {speedup:.1f}x ({'met' if speedup >= SPEEDUP_GOAL else 'not met'})"
        if ours["scores"] and other["scores"]:
            gain = ours["scores"][0] - other["scores"][0]
            line += f"; purity({method}) - purity(spectral) = {gain:+.3f} ({'met' if gain >= 0 else 'not met'})"
        print(line)
    faiss = results.get("faiss")
    if faiss and n >= 1_000_000:
        fits = faiss["peak_gib"] <= MEMORY_GOAL_GIB
        print(f"{name}: faiss peak RSS {faiss['peak_gib']:.2f} GiB ({'met' if fits else 'not met'}: <= {MEMORY_GOAL_GIB} GiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="a finished run whose embed entry gives the real embeddings")
    parser.add_argument("--labels", type=Path, help="ground-truth label PNGs for --workdir's images")
    parser.add_argument("--synthetic", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--spectral-max", type=int, default=20_000)
    parser.add_argument("--faiss-spectral-max", type=int, default=100_000)
    parser.add_argument("--sklearn-kmeans-max", type=int, default=100_000)
    parser.add_argument("--noise", type=float, default=4.0, help="synthetic noise norm (centres have norm 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pca-dim", type=int, default=0, help="project on this many principal components first")
    parser.add_argument("--whiten", action="store_true", help="with --pca-dim: whiten the components")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "VECTORS", "ASSIGNMENT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        measure_one(*args.one, args.k, args.seed, args.pca_dim, args.whiten)
        return
    if args.labels and not args.workdir:
        parser.error("--labels needs --workdir")
    params = cluster.Params(k=args.k)
    print(f"k {args.k}, seed {args.seed}; faiss niter {params.niter}, nredo {params.nredo}, max_points_per_centroid "
          f"{params.max_points_per_centroid} (core_fraction not applied: every object is scored)")
    if args.workdir:
        real_path, real_truth = real(args.workdir, args.labels)
        print(f"real: {real_path}, {len(real_truth)} objects, {int((real_truth >= 0).sum())} with a ground-truth class")
    print(f"{'dataset':18s} {'objects':>8s} {'method':14s} {'seconds':>9s} {'peak GiB':>9s} {'+GiB':>7s} {'purity':>7s} {'NMI':>7s}")
    measured = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        if args.workdir:
            measured.append(("real", len(real_truth), run_dataset("real", real_path, real_truth, scratch, args)))
        for n in args.synthetic:
            name, path = f"synthetic-{n}", scratch / "synthetic.npy"
            truth = synthetic(path, n, args.k, args.noise, args.seed)
            measured.append((name, n, run_dataset(name, path, truth, scratch, args)))
    print()
    for name, n, results in measured:
        print_ratios(name, n, results)


if __name__ == "__main__":
    main()
