"""faiss, loaded so that its own OpenMP runtime sleeps rather than spins while it waits.

faiss's k-means runs many short parallel regions. By default a waiting OpenMP thread spins; when another
process holds a core (a shared server, a CI runner), every region then waits for the descheduled thread:
k-means was 5-16x slower on a busy 2-core machine, depending on the run (`benchmarks/omp_wait_policy.py`). torch's long
regions are 9-13% faster spinning, so only faiss's runtime should sleep. faiss's wheel ships its own
libgomp, which reads OMP_WAIT_POLICY once, when it loads; but faiss uses that runtime only when it loads
before torch: torch puts its libgomp in the process's global symbol scope, and a faiss loaded later binds
to it. Hence the `pipeline` package imports this module first. A policy the user set is left alone.
"""
from __future__ import annotations

import os


def _load_faiss():
    if "OMP_WAIT_POLICY" in os.environ:
        import faiss
        return faiss
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        import faiss
    finally:
        del os.environ["OMP_WAIT_POLICY"]  # torch's runtime, loaded later, keeps spinning
    return faiss


faiss = _load_faiss()
