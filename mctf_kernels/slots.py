"""The slot index: which input tokens each output slot holds, as a CSR-like inverse
of a slot map (docs/algorithm.md, "Pooling").

``order`` (B, T) lists the tokens by slot, ascending token index inside a slot;
slot o's members are ``order[b, starts[b, o]:starts[b, o + 1]]``, ``starts``
(B, T'+1). A token whose slot is outside [0, T') belongs to no slot: it is listed
after every slot's members (``order[b, starts[b, T']:]``, ascending).

The merge and the one-step-ahead attention output both walk slots by this index;
a fused layer takes it from the matcher (``match(..., return_slots=True)``, written in
the matcher's own launch on the Triton path) and passes it to both. ``slot_index``
computes it for any map.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class SlotIndex(NamedTuple):
    order: torch.Tensor  # (B, T) int64
    starts: torch.Tensor  # (B, T'+1) int64


def slot_index_reference(dest: torch.Tensor, t_out: int) -> SlotIndex:
    """Eager slot index: a stable sort of the slot map (out-of-range slots sort last)."""
    B = dest.shape[0]
    dest = dest.long()
    key = torch.where((dest >= 0) & (dest < t_out), dest, t_out)
    sorted_key, order = torch.sort(key, dim=1, stable=True)
    bounds = torch.arange(t_out + 1, device=dest.device).expand(B, t_out + 1).contiguous()
    starts = torch.searchsorted(sorted_key.contiguous(), bounds)
    return SlotIndex(order.contiguous(), starts.contiguous())
