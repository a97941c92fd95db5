"""Attention-side ops of one-step-ahead fusion (SPEC sections 3 and 6)."""
from __future__ import annotations

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


__all__ = [
    "attention_received_reference",
    "merged_attention_reference",
    "fused_attention_output_reference",
    "segment_max",
]
