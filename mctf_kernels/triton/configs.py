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

# An H100 has 132 SMs; below this many programs a launch leaves SMs idle.
_MIN_PROGRAMS = 2 * 132


def slot_index_config(device: torch.device, T: int, t_out: int) -> dict:
    """``_slot_index_kernel``: BLOCK_I tokens ranked per program against BLOCK_J-wide tiles."""
    if not gpu_configs(device):  # one program per image: the interpreter pays per program
        n = triton.next_power_of_2(max(T, t_out + 1))
        return dict(BLOCK_I=n, BLOCK_J=n, num_warps=4)
    # 32 x 128 int32 compares per step: 32 values per thread at 4 warps
    return dict(BLOCK_I=32, BLOCK_J=128, num_warps=4)


def merge_config(device: torch.device, rows: int, T: int, t_out: int, C: int, N: int) -> dict:
    """``_merge_kernel``: BLOCK_S slots x BLOCK_C channels per step, channels looped.

    ``rows`` is the number of (image, head) rows, N the source width (0: none).
    BLOCK_C is the largest power of two up to 128 that divides C (no idle lanes at
    C = 192, 384, 768, ...). Four slots per program: on sm_90 the kernel's registers
    grow with the slots per program, not the channels (ptxas, 4 warps, fp16: 4 slots 48
    registers, 8 slots 110, 16 slots ~200 with spills in max pooling). When the grid is
    small (batch 1) the channels are split across programs (SPLIT_C) to fill the GPU.
    """
    if not gpu_configs(device):
        return dict(BLOCK_S=min(64, triton.next_power_of_2(max(t_out, 1))), BLOCK_C=triton.next_power_of_2(max(C, 16)),
                    BLOCK_N=triton.next_power_of_2(max(N, 16)), BLOCK_T=triton.next_power_of_2(max(T, 16)),
                    SPLIT_C=1, num_warps=4)
    block_c = 128
    while block_c > 16 and C % block_c:
        block_c //= 2
    block_s = 4
    chunks = triton.cdiv(C, block_c)
    split = 1
    while split < chunks and rows * triton.cdiv(t_out, block_s) * split < _MIN_PROGRAMS:
        split *= 2
    return dict(BLOCK_S=block_s, BLOCK_C=block_c, BLOCK_N=128, BLOCK_T=128, SPLIT_C=min(split, chunks),
                num_warps=4 if block_s * block_c >= 512 else 2)


# ---------------------------------------------------------------- attention
