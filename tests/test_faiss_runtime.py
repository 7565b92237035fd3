"""faiss runs on its own OpenMP runtime, told to sleep while waiting, and clusters exactly as before."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Two OpenMP runtimes are told apart by their thread-count setting: torch.set_num_threads changes
# faiss's only when faiss is bound to torch's runtime.
PROBE = r"""
import hashlib, json, sys
sys.path.insert(0, sys.argv[1])
if sys.argv[2] == "pipeline_first":
    import pipeline
import torch
import numpy as np
from stages import cluster
faiss = cluster.faiss
faiss.omp_set_num_threads(3)
torch.set_num_threads(1)
x = np.random.default_rng(0).normal(size=(3000, 32)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
centroids, assignment, distance = cluster.spherical_kmeans(x, cluster.Params(k=7), 0)
print(json.dumps({"faiss_threads": faiss.omp_get_max_threads(),
                  "assignment": hashlib.sha256(assignment.tobytes()).hexdigest(),
                  "distance": distance.round(5).tolist()[:50]}))
"""


def probe(order: str) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(OMP_DISPLAY_ENV="VERBOSE", OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), order], env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def spin_counts(stderr: str) -> list[str]:
    return [line.split("=")[1].strip(" '") for line in stderr.splitlines() if line.strip().startswith("GOMP_SPINCOUNT")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the libgomp layout of the Linux wheels")
def test_faiss_gets_its_own_sleeping_runtime_and_the_same_clusters():
    ours, ours_log = probe("pipeline_first")
    shared, shared_log = probe("torch_first")
    # faiss loaded first keeps its own runtime (its thread count unaffected by torch's), which loaded
    # with spin count 0 (PASSIVE) while torch's, loaded next, still spins; loaded after torch, faiss
    # binds to torch's spinning runtime.
    assert ours["faiss_threads"] == 3 and shared["faiss_threads"] == 1
    assert spin_counts(ours_log)[0] == "0" and spin_counts(ours_log)[1] != "0"
    assert spin_counts(shared_log)[0] != "0"
    assert ours["assignment"] == shared["assignment"] and ours["distance"] == shared["distance"]
