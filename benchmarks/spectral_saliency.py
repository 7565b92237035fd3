"""Per-photo cost of spectral saliency's parts, and the eigen-solvers side by side on the same photos.

    python3 benchmarks/spectral_saliency.py --images DIR [--weights mobilenet.pt] [--count 40]

For each photo: the backbone's patch features, the affinity graph, then the Fiedler vector by LAPACK's
dense generalized solver, by LAPACK's dense symmetric solver on the normalized affinity (what the stage
uses), by ARPACK's Lanczos on the same, and by torch.linalg.eigh on a batch of the photos. Each
alternative's vector is compared with the generalized solver's (|correlation|), and ARPACK is called twice on each graph: where the second eigenvalue is repeated it
need not return the same vector twice, which would make a cached mask depend on the photos before it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.backbones import BackboneParams, build_backbone  # noqa: E402
from pipeline.images import load_rgb, scan_images  # noqa: E402
from stages.saliency import Params, _Spectral, fiedler_foreground  # noqa: E402


def graph(features: torch.Tensor, tau: float) -> np.ndarray:
    x = features.flatten(1).T.numpy().astype(np.float64)
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.where(unit @ unit.T > tau, 1.0, 1e-5)


def lapack(weights: np.ndarray) -> np.ndarray:
    degree = np.diag(weights.sum(axis=1))
    return scipy.linalg.eigh(degree - weights, degree, subset_by_index=[1, 1])[1][:, 0]


def arpack(weights: np.ndarray) -> np.ndarray:
    scale = 1.0 / np.sqrt(weights.sum(axis=1))
    values, vectors = scipy.sparse.linalg.eigsh(scale[:, None] * weights * scale[None], k=2, which="LA",
                                                v0=np.random.default_rng(0).uniform(0.5, 1.5, len(scale)))
    return vectors[:, np.argmin(values)] * scale


def torch_batch(graphs: list[np.ndarray]) -> np.ndarray:
    weights = torch.from_numpy(np.stack(graphs))
    scale = weights.sum(-1).rsqrt()
    return (torch.linalg.eigh(scale[..., :, None] * weights * scale[..., None, :])[1][..., -2] * scale).numpy()


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True)
    parser.add_argument("--weights", default="", help="MobileNetV2 weights (default: a random tiny ViT)")
    parser.add_argument("--count", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(2)
    backbone = BackboneParams("mobilenet_v2", args.weights) if args.weights else BackboneParams("vit_tiny_random")
    spectral = _Spectral.__new__(_Spectral)
    spectral.backbone, spectral.params, spectral.device = build_backbone(backbone), Params(), torch.device("cpu")
    records = scan_images(args.images)[0][:args.count]
    costs = {name: [] for name in ("features", "graph", "LAPACK generalized", "stage's cut (symmetric)",
                                   "ARPACK normalized")}
    graphs, agreement, symmetric_agreement, repeated = [], [], [], 0
    for record in records:
        features, seconds = timed(spectral.features, load_rgb(record.path))
        costs["features"].append(seconds)
        weights, seconds = timed(graph, features, spectral.params.tau)
        costs["graph"].append(seconds)
        reference, seconds = timed(lapack, weights)
        costs["LAPACK generalized"].append(seconds)
        x = features.flatten(1).T.numpy().astype(np.float64)
        split, seconds = timed(fiedler_foreground, x, tuple(features.shape[1:]), spectral.params.tau)
        costs["stage's cut (symmetric)"].append(seconds)  # its graph included
        symmetric_agreement.append(abs(np.corrcoef(reference, split.reshape(-1))[0, 1]))
        first, seconds = timed(arpack, weights)
        costs["ARPACK normalized"].append(seconds)
        repeated += not np.allclose(abs(first), abs(arpack(weights)), atol=1e-6)
        agreement.append(abs(np.corrcoef(reference, first)[0, 1]))
        graphs.append(weights)
    batched, seconds = timed(torch_batch, graphs)
    print(f"{len(records)} photos, {backbone.name}, grid {features.shape[1]}x{features.shape[2]}, 2 threads")
    for name, values in costs.items():
        print(f"{name:<22} {1000 * np.mean(values):7.1f} ms/photo")
    print(f"{'torch eigh, one batch':<22} {1000 * seconds / len(records):7.1f} ms/photo")
    batch_agreement = [abs(np.corrcoef(lapack(w), v)[0, 1]) for w, v in zip(graphs, batched)]
    print(f"|corr| with LAPACK's generalized vector: stage's min {min(symmetric_agreement):.4f}, "
          f"ARPACK min {min(agreement):.4f}, torch min {min(batch_agreement):.4f}; "
          f"ARPACK gave a different vector on a second call for {repeated} of {len(records)} graphs")


if __name__ == "__main__":
    main()
