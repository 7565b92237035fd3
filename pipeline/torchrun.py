"""This process's place among the processes torchrun started, read from the environment torchrun sets.

Plain `python` sets none of it: one process, rank 0. Read before the process group is joined (the
runner, the CLI and the run log decide who writes from it); torch-free so that they stay light.
"""
from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """The rank on this host: which GPU the process takes."""
    return int(os.environ.get("LOCAL_RANK", "0"))
