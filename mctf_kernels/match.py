"""Bipartite matching (docs/algorithm.md, "Matching"): from scores to a slot map.

The result is ``dest`` (B, T) int64: the output slot of every input token. Slots
are numbered in the output token order, so merging by ``dest`` reproduces the
public code's two-stage merge, token order included.

Tie-breaking (the public code uses an unstable sort, so its ties are
unspecified; ours are deterministic and identical in every backend):
- argmax over a row/column picks the lowest index among equal maxima;
- descending orderings are stable: equal scores keep ascending token index.
- NaN scores (NaN or inf in the inputs) rank above every number, as torch's max
  and sort order them; the Triton kernels compare NaN as +inf (the same order:
  a finite input gives scores in [0, 1]), so every slot stays in [0, T - r).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import check_per_token, check_tokens
from .schedule import split_directions
from .scores import check_score, scores_reference


def _check_r(r: int, num_tokens: int, num_protected: int) -> None:
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int (use mctf_kernels.tokens_to_remove for fractions), got {r!r}")
    limit = (num_tokens - num_protected) // 2
    if not 0 <= r <= limit:
        raise ValueError(
            f"r must be in [0, (T - num_protected) // 2 = {limit}] for T={num_tokens}, "
            f"num_protected={num_protected}; got r={r}"
        )


def match_from_scores_reference(
    scores: torch.Tensor, r: int, *, num_protected: int = 1, bidirectional: bool = True
) -> torch.Tensor:
    """Slot map (B, T) int64 from a score matrix (B, t1, t2), T = t1 + t2."""
    if scores.dim() != 3:
        raise ValueError(f"scores must have shape (B, t1, t2), got {tuple(scores.shape)}")
    B, t1, t2 = scores.shape
    T = t1 + t2
    if t1 not in (t2, t2 + 1):
        raise ValueError(f"scores must be (B, ceil(T/2), floor(T/2)), got {tuple(scores.shape)}")
    _check_r(r, T, num_protected)
    device = scores.device
    dest = torch.arange(T, device=device).expand(B, T).clone()
    if r == 0:
        return dest
    r1, r2 = split_directions(r, bidirectional)
    n_unm = t1 - r1

    node_max, node_idx = scores.max(dim=-1)
    rank_a = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
    src_a = rank_a[:, :r1]
    unm_a = rank_a[:, r1:]
    if num_protected:
        unm_a = unm_a.sort(dim=-1).values  # keep prefix tokens first

    slot_b = torch.empty(B, t2, dtype=torch.int64, device=device)
    if bidirectional:
        unm_scores = scores.gather(1, unm_a[:, :, None].expand(B, n_unm, t2))
        node_max2, node_idx2 = unm_scores.max(dim=1)  # argmax = position in the unmerged list
        rank_b = torch.sort(node_max2, dim=-1, descending=True, stable=True).indices
        src_b, keep_b = rank_b[:, :r2], rank_b[:, r2:]
        slot_b.scatter_(1, keep_b, torch.arange(n_unm, n_unm + t2 - r2, device=device).expand(B, -1))
        slot_b.scatter_(1, src_b, node_idx2.gather(1, src_b))
    else:
        slot_b[:] = torch.arange(n_unm, n_unm + t2, device=device)

    slot_a = torch.empty(B, t1, dtype=torch.int64, device=device)
    slot_a.scatter_(1, unm_a, torch.arange(n_unm, device=device).expand(B, -1))
    slot_a.scatter_(1, src_a, slot_b.gather(1, node_idx.gather(1, src_a)))

    dest = torch.empty(B, T, dtype=torch.int64, device=device)
    dest[:, 0::2] = slot_a
    dest[:, 1::2] = slot_b
    if num_protected > 1:
        dest = _protected_first(dest, T - r, num_protected)
    return dest


def _protected_first(dest: torch.Tensor, t_out: int, num_protected: int) -> torch.Tensor:
    """Move the slots of the prefix tokens to the front, in prefix order.

    Each prefix token owns its slot alone; other slots keep their relative order.
    With one prefix token (the class token) it is already at slot 0.
    """
    B = dest.shape[0]
    prefix_slots = dest[:, :num_protected]
    is_prefix = torch.zeros(B, t_out, dtype=torch.bool, device=dest.device)
    is_prefix.scatter_(1, prefix_slots, True)
    remap = torch.cumsum((~is_prefix).long(), dim=1) - 1 + num_protected
    remap.scatter_(1, prefix_slots, torch.arange(num_protected, device=dest.device).expand(B, -1))
    return remap.gather(1, dest)


def match_reference(
    x: torch.Tensor,
    r: int,
    attn_received: Optional[torch.Tensor] = None,
    size: Optional[torch.Tensor] = None,
    *,
    tau_sim: float = 1.0,
    tau_info: float = 20.0,
    tau_size: float = 40.0,
    num_protected: int = 1,
    bidirectional: bool = True,
    score: str = "mctf",
) -> torch.Tensor:
    """Eager score-and-match: the slot map (B, T) int64; the output has T - r tokens.
    ``score="cosine"``: ToMe's raw cosine (docs/algorithm.md, "ToMe mode")."""
    check_tokens("x", x)
    B, T, _ = x.shape
    _check_r(r, T, num_protected)
    check_per_token("attn_received", attn_received, B, T, x.device)
    check_per_token("size", size, B, T, x.device)
    check_score(score)
    if r == 0:
        return torch.arange(T, device=x.device).expand(B, T).clone()
    with torch.no_grad():  # the matching itself is not differentiated
        scores = scores_reference(
            x, attn_received, size, tau_sim=tau_sim, tau_info=tau_info, tau_size=tau_size,
            num_protected=num_protected, score=score,
        )
        return match_from_scores_reference(scores, r, num_protected=num_protected, bidirectional=bidirectional)
