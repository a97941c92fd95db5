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
import triton

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
# Half precision: 64-row query tiles (one Hopper warpgroup MMA has M = 64). Both
# kernels keep their fp32 tiles in registers; the sizes below are spill-free on sm_90
# (compiled as tests/aot_sm90.py does, unit strides specialised as the JIT does).
# float32 dots run on FMA units with operands in registers, hence smaller tiles.

#: largest key row the received kernel holds on chip in one tile (one q.k^T pass)
ATTENTION_ONE_TILE_MAX_T = 256


def attention_received_qk_config(T: int, D: int, gpu: bool, wide_dtype: bool = False) -> dict:
    """``_attention_lse_received_kernel``: queries per program, keys per tile, head-dim
    block, warps, and whether the whole key row is one tile (T <= 256: q.k^T once).
    ``wide_dtype``: float32/float64 q, k (FMA dots, operands in registers: smaller tiles)."""
    block_d = max(16, triton.next_power_of_2(D))
    if not gpu:  # interpreter: fewest, largest programs
        block_n = max(16, min(triton.next_power_of_2(T), 1024))
        return dict(BLOCK_M=128, BLOCK_N=block_n, BLOCK_D=block_d, ONE_TILE=T <= block_n, num_warps=4)
    # sm_90, fp16, D = 64: one tile (64 x 256 logits) on 8 warps is 25% occupancy with
    # no spills; the two-loop form on 8 warps 50% (4 warps: 37.5%).
    if T <= ATTENTION_ONE_TILE_MAX_T and block_d <= 128:
        block_n = max(16, triton.next_power_of_2(T))
        return dict(BLOCK_M=32 if wide_dtype else 64, BLOCK_N=block_n, BLOCK_D=block_d, ONE_TILE=True,
                    num_warps=8 if block_n > 128 else 4)
    return dict(BLOCK_M=64, BLOCK_N=64 if block_d <= 64 and not wide_dtype else 32, BLOCK_D=block_d,
                ONE_TILE=False, num_warps=8)


def attention_output_config(D: int, D_QK: int, gpu: bool, wide_dtype: bool = False) -> dict:
    """``_fused_attention_output_kernel``: query rows per tile (in slot order), keys per
    step, head-dim blocks, the block of the size-max scan, warps. ``wide_dtype``: float32
    or float64 values (FMA dots: 32 x 32 tiles, 182 registers on 8 warps, no spills)."""
    block_d = max(16, triton.next_power_of_2(D))
    block_dk = max(16, triton.next_power_of_2(D_QK))
    if not gpu:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=block_d, BLOCK_DK=block_dk, BLOCK_T=1024, num_warps=4)
    # 8 warps (two warpgroups): 120 registers at D = 64 on sm_90 -> 2 CTAs = 25%
    # occupancy, no spills (4 warps: 168 registers, 18.75%).
    wide = max(block_d, block_dk) > 64
    if wide_dtype:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d, BLOCK_DK=block_dk, BLOCK_T=256, num_warps=8)
    return dict(BLOCK_M=64, BLOCK_N=32 if wide else 64, BLOCK_D=block_d, BLOCK_DK=block_dk, BLOCK_T=256,
                num_warps=8)
