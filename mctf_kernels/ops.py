"""Public op API: each op validates its arguments, then runs the backend chosen by
``dispatch`` (Triton launcher or the eager reference beside it)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import dispatch
from ._checks import check_dest, check_per_token, check_pooling, check_temperature, check_tokens
from .attention import (
    FusionAttention,
    attention_received_reference,
    fused_attention_output_qk_reference,
    fused_attention_output_reference,
    fusion_attention_reference,
)
from .match import _check_r, match_reference
from .merge import merge_reference


def match(
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
) -> torch.Tensor:
    """Multi-criteria score + bipartite matching. Returns the slot map ``dest`` (B, T)
    int64; the fused output has ``T - r`` tokens (``r`` as from ``tokens_to_remove``)."""
    check_tokens("x", x)
    B, T, _ = x.shape
    _check_r(r, T, num_protected)
    check_per_token("attn_received", attn_received, B, T, x.device)
    check_per_token("size", size, B, T, x.device)
    for name, tau in (("tau_sim", tau_sim), ("tau_info", tau_info), ("tau_size", tau_size)):
        check_temperature(name, tau)
    kwargs = dict(tau_sim=tau_sim, tau_info=tau_info, tau_size=tau_size,
                  num_protected=num_protected, bidirectional=bool(bidirectional))
    launcher = dispatch.select("match", x.device)
    if launcher is None:
        return match_reference(x, r, attn_received, size, **kwargs)
    return launcher(x, r, attn_received, size, **kwargs)


def merge(
    x: torch.Tensor,
    dest: torch.Tensor,
    t_out: int,
    size: Optional[torch.Tensor] = None,
    attn_received: Optional[torch.Tensor] = None,
    *,
    mode: int = 1,
    source: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Pool tokens sharing a slot. Returns (x' (B, T', C), size' (B, T') float32,
    source' (B, T', N) or None). ``size=None`` means all ones."""
    check_tokens("x", x)
    B, T, _ = x.shape
    check_dest(dest, B, T, t_out, x.device)
    check_per_token("size", size, B, T, x.device)
    check_per_token("attn_received", attn_received, B, T, x.device)
    check_pooling(mode)
    if mode == 1 and attn_received is None:
        raise ValueError("merge mode 1 (attention-and-size pooling) needs attn_received")
    launcher = dispatch.select("merge", x.device)
    if launcher is None:
        return merge_reference(x, dest, t_out, size, attn_received, mode=mode, source=source)
    return launcher(x, dest, t_out, size, attn_received, mode=mode, source=source)


def attention_received(attn: torch.Tensor) -> torch.Tensor:
    """Mean attention each key receives over heads and queries: (B, H, T, T) -> (B, T) float32."""
    if not isinstance(attn, torch.Tensor) or attn.dim() != 4:
        raise ValueError(f"attn must be a tensor of shape (B, H, T, T), got {getattr(attn, 'shape', attn)!r}")
    launcher = dispatch.select("attention_received", attn.device)
    if launcher is None:
        return attention_received_reference(attn)
    return launcher(attn)


def fused_attention_output(
    attn: torch.Tensor,
    v: torch.Tensor,
    dest: torch.Tensor,
    t_out: int,
    size: Optional[torch.Tensor] = None,
    attn_received: Optional[torch.Tensor] = None,
    *,
    mode: int = 1,
) -> torch.Tensor:
    """One-step-ahead attention output P' @ V' (B, H, T', D) without forming P'
    (except max pooling, whose P' does not factor)."""
    if not isinstance(attn, torch.Tensor) or attn.dim() != 4:
        raise ValueError(f"attn must be a tensor of shape (B, H, T, T), got {getattr(attn, 'shape', attn)!r}")
    check_pooling(mode)
    if mode == 1 and attn_received is None:
        raise ValueError("mode 1 (attention-and-size pooling) needs attn_received")
    extra = "max pooling forms P' (no fused kernel)" if mode == 2 else None
    launcher = dispatch.select("fused_attention_output", attn.device, extra if dispatch.get_backend() != "reference" else None)
    if launcher is None:
        return fused_attention_output_reference(attn, v, dest, t_out, size, attn_received, mode=mode)
    return launcher(attn, v, dest, t_out, size, attn_received, mode=mode)


def fusion_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    log_size: Optional[torch.Tensor] = None,
    mode: int = 1,
) -> FusionAttention:
    """The attention of a one-step-ahead block before fusion: softmax(q k^T * scale [+ log s]).

    Returns a ``FusionAttention`` whose ``received`` (B, T) drives matching; pass it to
    ``fused_attention_output_from`` after merging. The Triton path keeps only q, k and
    per-query log-sum-exps (flash-style); the reference forms P. ``mode`` is the pooling
    mode the output will use (max pooling needs P formed).
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a tensor of shape (B, H, T, D), got {getattr(t, 'shape', t)!r}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.device != k.device:
        raise ValueError(f"q is on {q.device} but k is on {k.device}")
    B, _, T, _ = q.shape
    check_per_token("log_size", log_size, B, T, q.device)
    check_pooling(mode)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    extra = "max pooling forms P' (no fused kernel)" if mode == 2 else None
    launcher = dispatch.select("fusion_attention", q.device, extra if dispatch.get_backend() != "reference" else None)
    if launcher is None:
        return fusion_attention_reference(q, k, scale=float(scale), log_size=log_size)
    return launcher(q, k, scale=float(scale), log_size=log_size)


def fused_attention_output_from(
    att: FusionAttention,
    v: torch.Tensor,
    dest: torch.Tensor,
    t_out: int,
    size: Optional[torch.Tensor] = None,
    *,
    mode: int = 1,
) -> torch.Tensor:
    """One-step-ahead output P' @ V' (B, H, T', D) from ``fusion_attention``'s result."""
    if not isinstance(att, FusionAttention):
        raise TypeError(f"att must be the FusionAttention from fusion_attention, got {type(att).__name__}")
    if att.probs is not None:
        return fused_attention_output(att.probs, v, dest, t_out, size, att.received, mode=mode)
    check_pooling(mode)
    B, H, T, _ = att.q.shape
    if v.dim() != 4 or v.shape[:3] != (B, H, t_out):
        raise ValueError(f"v must have shape (B, H, T', D) = ({B}, {H}, {t_out}, D), got {tuple(v.shape)}")
    check_dest(dest, B, T, t_out, v.device)
    launcher = dispatch.select("fused_attention_output_qk", v.device)
    args = (att.q, att.k, att.lse, att.log_size, att.scale, v, dest, t_out, size, att.received)
    if launcher is None:
        return fused_attention_output_qk_reference(*args, mode=mode)
    return launcher(*args, mode=mode)
