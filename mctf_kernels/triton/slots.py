"""Triton launcher of ``slot_index`` (``mctf_kernels.slots``): one launch for every image,
equal to ``slot_index_reference`` exactly."""
from __future__ import annotations

from typing import Tuple

import torch
import triton

from ..slots import SlotIndex, slot_index_reference  # noqa: F401  (the reference beside its launcher)
from ._common import custom_op, device_guard, wrap
from ._slots_kernel import _slot_index_kernel
from .configs import slot_index_config


def launch_slot_index(dest: torch.Tensor, t_out: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """order (B, T) int64, starts (B, T'+1) int64 of the slot map ``dest`` (B, T)."""
    B, T = dest.shape
    order = torch.empty(B, T, device=dest.device, dtype=torch.int64)
    starts = torch.empty(B, t_out + 1, device=dest.device, dtype=torch.int64)
    if B == 0:
        return order, starts
    cfg = dict(slot_index_config(dest.device, T, t_out))
    grid = (B, triton.cdiv(max(T, t_out + 1), cfg["BLOCK_I"]))
    with device_guard(dest):
        wrap(_slot_index_kernel)[grid](dest, dest.stride(0), dest.stride(1), order, starts, T, t_out, **cfg)
    return order, starts


slot_index_op = custom_op("slot_index", launch_slot_index)


def slot_index(dest: torch.Tensor, t_out: int) -> SlotIndex:
    """Triton ``slot_index``: (order (B, T), starts (B, T'+1)), int64, without host sync."""
    if dest.dim() != 2 or dest.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"dest must be an int64 or int32 (B, T) slot map, got {dest.dtype} {tuple(dest.shape)}")
    if t_out < 0:
        raise ValueError(f"t_out must be >= 0, got {t_out}")
    order, starts = slot_index_op(dest, int(t_out))
    return SlotIndex(order, starts)
