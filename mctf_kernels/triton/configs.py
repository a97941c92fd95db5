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
    tiled path, block sizes, warps and stages.

    GPU (sm_90 compiles at DeiT-S and ViT-L/16@384 shapes, preset temperatures):
    - fused: 16 warps, 64 score rows per step, channel chunks of 32 (half, tensor
      cores) or 16 (fp32 FMA dot), rank keys in chunks of 16, one stage: 128
      registers, no spills, 25% occupancy (one 16-warp CTA per SM). 8 warps, 128 rows
      per step, 32-key chunks or pipelining (stages > 1) all spill.
    - tiled: 64 x 64 score tiles, 16 warps, one stage: 64-124 registers, no spills,
      25-50% occupancy (4 warps: 255 registers with spills, 12.5%).
    Interpreter: the largest blocks (each op costs Python time, not FLOPs)."""
    def p2(n: int) -> int:
        return 1 << max(n - 1, 0).bit_length()

    fused = max(t1, t2) <= MATCH_FUSED_MAX_HALF
    if gpu and fused:
        tile, rows, chunk, rank, warps, stages = 128, 64, 32 if half else 16, 16, 16, 1
    elif gpu:
        tile, rows, chunk, rank, warps, stages = 64, 64, 64 if half else 32, 128, 16, 1
    else:
        tile, rows, chunk, rank, warps, stages = 128, 128, 256, 256, None, None
    cfg = dict(
        fused=fused,
        BLOCK_A=max(16, min(tile, p2(t1))),
        BLOCK_B=max(16, min(tile, p2(t2))),
        BLOCK_M=rows,
        BLOCK_C=max(16, min(chunk, p2(C))),
        BLOCK_J=max(16, min(rank, p2(T))),
        num_warps=warps,
        num_stages=stages,
    )
    cfg["BLOCK_R"] = cfg["BLOCK_J"]
    return cfg



# ---------------------------------------------------------------- merge and slot index


# ---------------------------------------------------------------- attention
