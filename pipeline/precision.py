"""Mixed precision: float16 autocast on CUDA (the keys say so where it changes the bytes), float32 on the CPU."""
from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()
