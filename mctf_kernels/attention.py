"""Attention-side ops of one-step-ahead fusion (docs/algorithm.md, "One-step-ahead attention").

Query rows are pooled with ``merge``'s rules, degenerate inputs included (docs/algorithm.md,
"Accepted inputs"): a slot whose weights sum to 0 takes the unweighted mean of its members'
rows, and a NaN in row q of P reaches only output row ``dest[q]``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ._checks import check_dest, check_pooling
from .merge import merge_tokens_reference, pooling_weights, segment_max


def attention_received_reference(attn: torch.Tensor) -> torch.Tensor:
    """attn_m[k]: mean over heads and queries of P[h, q, k]; (B, H, T, T) -> (B, T) float32."""
    if attn.dim() != 4:
        raise ValueError(f"attn must have shape (B, H, T, T), got {tuple(attn.shape)}")
    return attn.float().mean(dim=(1, 2))


def merged_attention_reference(
    attn: torch.Tensor,
    dest: torch.Tensor,
    t_out: int,
    size: Optional[torch.Tensor],
    attn_received: Optional[torch.Tensor],
    *,
    mode: int,
) -> torch.Tensor:
    """The fused attention P' (B, H, T', T'): key columns summed per slot, query rows pooled."""
    B, H, T, _ = attn.shape
    check_dest(dest, B, T, t_out, attn.device)
    check_pooling(mode)
    dest = dest.long()
    cols = attn.new_zeros(B, H, T, t_out).scatter_add(-1, dest[:, None, None, :].expand(B, H, T, T), attn)
    if size is None:
        size = torch.ones(B, T, device=attn.device, dtype=torch.float32)
    weights = pooling_weights(mode, size, attn_received)
    return merge_tokens_reference(cols, dest, t_out, weights)


def fused_attention_output_reference(
    attn: torch.Tensor,
    v: torch.Tensor,
    dest: torch.Tensor,
    t_out: int,
    size: Optional[torch.Tensor] = None,
    attn_received: Optional[torch.Tensor] = None,
    *,
    mode: int = 1,
) -> torch.Tensor:
    """P' @ V' (B, H, T', D) for one-step-ahead mode 1, from the pre-fusion P (B, H, T, T)
    and the values of the fused tokens V' (B, H, T', D).

    For the weighted modes P' @ V' = rowmerge(P @ V'[dest]), so P' is never formed;
    max pooling does not commute with the product and forms P'.
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must have shape (B, H, T, T), got {tuple(attn.shape)}")
    B, H, T, _ = attn.shape
    if v.dim() != 4 or v.shape[:3] != (B, H, t_out):
        raise ValueError(f"v must have shape (B, H, T', D) = ({B}, {H}, {t_out}, D), got {tuple(v.shape)}")
    check_dest(dest, B, T, t_out, attn.device)
    check_pooling(mode)
    dest = dest.long()
    if mode == 2:
        return merged_attention_reference(attn, dest, t_out, size, attn_received, mode=2).to(v.dtype) @ v
    if size is None:
        size = torch.ones(B, T, device=attn.device, dtype=torch.float32)
    with torch.no_grad():
        weights = pooling_weights(mode, size, attn_received)
    v_per_key = v.gather(2, dest[:, None, :, None].expand(B, H, T, v.shape[-1]))
    per_query = attn.to(v.dtype) @ v_per_key
    return merge_tokens_reference(per_query, dest, t_out, weights)


@dataclasses.dataclass
class FusionAttention:
    """A one-step-ahead block's attention before fusion, in whichever form the backend keeps.

    The reference forms the probabilities (``probs``); the Triton path keeps ``q``, ``k``
    and each query's log-sum-exp ``lse`` and recomputes probabilities tile by tile, so the
    (B, H, T, T) attention is never written to memory.
    """

    received: torch.Tensor  # (B, T) float32: mean attention each token receives
    probs: Optional[torch.Tensor] = None  # (B, H, T, T)
    q: Optional[torch.Tensor] = None  # (B, H, T, D)
    k: Optional[torch.Tensor] = None  # (B, H, T, D)
    lse: Optional[torch.Tensor] = None  # (B, H, T) float32
    log_size: Optional[torch.Tensor] = None  # (B, T) bias on the logits (proportional attention)
    scale: float = 1.0
    # (B, 1, 1, T) in q's dtype: log(size) as the output attention's additive mask (given sizes, else None)
    mask: Optional[torch.Tensor] = None
    size: Optional[torch.Tensor] = None  # (B, T): the token sizes, when given instead of their log

    def logits_bias(self) -> Optional[torch.Tensor]:
        """log_size (B, T) float32 of the logits: as given, or the log of the given sizes."""
        if self.log_size is not None or self.size is None:
            return self.log_size
        return self.size.log()


def attention_logits_reference(q, k, scale: float, log_size: Optional[torch.Tensor]) -> torch.Tensor:
    """(q * scale) @ k^T [+ log s on each key], in q's dtype: (B, H, T, T)."""
    logits = (q * scale) @ k.transpose(-2, -1)
    if log_size is not None:
        logits = logits + log_size.to(logits.dtype)[:, None, None, :]
    return logits


def fusion_attention_reference(
    q: torch.Tensor, k: torch.Tensor, *, scale: float, log_size: Optional[torch.Tensor] = None,
    size: Optional[torch.Tensor] = None,
) -> FusionAttention:
    """Form P = softmax(q k^T * scale [+ log s]) and the attention each token receives.
    Given ``size`` (instead of ``log_size``), also the output attention's mask log(size)
    in q's dtype."""
    if size is not None:
        if log_size is not None:
            raise ValueError("pass the token sizes as size= or their log as log_size=, not both")
        log_size = size.log()
    probs = attention_logits_reference(q, k, scale, log_size).softmax(dim=-1)
    mask = None if size is None else log_size.to(q.dtype)[:, None, None, :]
    return FusionAttention(received=attention_received_reference(probs.detach()), probs=probs,
                           log_size=log_size, scale=scale, mask=mask, size=size)


def fusion_attention_rows_reference(att: FusionAttention, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale [+ log s]) @ v (B, H, T, D): the output rows of the attention
    over the pre-fusion keys, ``v`` given at the T token rows (each key's slot value). From
    ``att.probs`` when formed, else recomputed explicitly from ``att.q``, ``att.k``."""
    probs = att.probs
    if probs is None:
        probs = attention_logits_reference(att.q, att.k, att.scale, att.logits_bias()).softmax(dim=-1)
    return probs.to(v.dtype) @ v


def fused_attention_output_qk_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: Optional[torch.Tensor],
    log_size: Optional[torch.Tensor],
    scale: float,
    v: torch.Tensor,
    dest: torch.Tensor,
    t_out: int,
    size: Optional[torch.Tensor] = None,
    attn_received: Optional[torch.Tensor] = None,
    *,
    mode: int = 1,
) -> torch.Tensor:
    """P' @ V' recomputing P from q and k (``lse`` is implied by q, k and is not needed here)."""
    probs = attention_logits_reference(q, k, scale, log_size).softmax(dim=-1)
    return fused_attention_output_reference(probs, v, dest, t_out, size, attn_received, mode=mode)


__all__ = [
    "FusionAttention",
    "attention_logits_reference",
    "fusion_attention_reference",
    "fusion_attention_rows_reference",
    "fused_attention_output_qk_reference",
    "attention_received_reference",
    "merged_attention_reference",
    "fused_attention_output_reference",
    "segment_max",
]
