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
# Largest A/B half handled by the single-launch kernel (one program per image,
# scores computed once, BLOCK_M rows at a time). T <= 256,
# every 224 px /16 model (T = 197 and fewer), takes that path.
MATCH_FUSED_MAX_HALF = 128


def match_configs(gpu: bool, t1: int, t2: int, C: int, T: int, half: bool) -> dict:
    """Launch configuration of the matcher: ``fused`` (one launch per image) or the
    tiled path, block sizes and warps. GPU: 8 warps for the fused kernel (the score
    row block and the dot's operands fit without spills); channel chunks of 64 for half
    dots, 32 for the fp32 FMA dot (register bound). Interpreter: the largest blocks
    (each op costs Python time, not FLOPs)."""
    def p2(n: int) -> int:
        return 1 << max(n - 1, 0).bit_length()

    fused = max(t1, t2) <= MATCH_FUSED_MAX_HALF
    if gpu:
        # fused: rows of the score tile per step (BLOCK_M), channel chunk, key chunk of the ranks
        rows, chunk, rank, warps = (64, 64 if half else 32, 32, 8) if fused else (64, 64 if half else 32, 128, 4)
        tile = 128 if fused else 64
    else:
        tile, rows, chunk, rank, warps = 128, 128, 256, 256, None
    cfg = dict(
        fused=fused,
        BLOCK_A=max(16, min(tile, p2(t1))),
        BLOCK_B=max(16, min(tile, p2(t2))),
        BLOCK_M=rows,
        BLOCK_C=max(16, min(chunk, p2(C))),
        BLOCK_J=max(16, min(rank, p2(T))),
        num_warps=warps,
    )
    cfg["BLOCK_R"] = cfg["BLOCK_J"]
    return cfg



# ---------------------------------------------------------------- merge and slot index


# ---------------------------------------------------------------- attention
