"""Every launch configuration (block sizes, warps, stages) of every kernel, in one place.

A launcher asks ``gpu_configs(device)`` which policy applies: the GPU's on CUDA
tensors, the interpreter's (few, large programs: each op costs Python time, not
FLOPs) on CPU tensors. Tests run the GPU policy under the interpreter with
``force_gpu_configs()``, so the tile loops that run on a GPU are checked on CPU too.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_forced_gpu = 0


@contextlib.contextmanager
def force_gpu_configs() -> Iterator[None]:
    """Use the GPU launch configurations for CPU tensors too (interpreter tests)."""
    global _forced_gpu
    _forced_gpu += 1
    try:
        yield
    finally:
        _forced_gpu -= 1


def gpu_configs(device: torch.device) -> bool:
    """True when launches on ``device`` use the GPU configurations."""
    return device.type == "cuda" or _forced_gpu > 0


# ---------------------------------------------------------------- match


# ---------------------------------------------------------------- merge and slot index


# ---------------------------------------------------------------- attention
