"""Mixed precision: float16 autocast on CUDA (the keys say so where it changes the bytes), float32 on the CPU."""
from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()


def device_in_key(device: str) -> dict:
    """The part of a key that says a stage's numbers come from a GPU (`device=` as configured: cpu, cuda or
    auto): float16 autocast and CUDA kernels do not give the CPU's bytes. Nothing on the CPU, so the keys
    made before the device was named stay valid."""
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return {"device": "cuda"} if on_gpu else {}
