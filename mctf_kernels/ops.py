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
from .slots import SlotIndex, slot_index_reference


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


def slot_index(dest: torch.Tensor, t_out: int) -> SlotIndex:
    """The members of each output slot of ``dest`` (B, T): ``SlotIndex(order (B, T), starts
    (B, T'+1))``, int64; slot o holds ``order[b, starts[b, o]:starts[b, o+1]]`` in ascending
    token order. Tokens with a slot outside [0, T') are in none (listed last). Compute it
    once per slot map and pass it as ``slots=`` to ``merge`` and the attention outputs."""
    if not isinstance(dest, torch.Tensor) or dest.dim() != 2 or dest.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"dest must be an int64 or int32 tensor of shape (B, T), got {getattr(dest, 'shape', dest)!r}")
    if isinstance(t_out, bool) or not isinstance(t_out, int) or t_out < 0:
        raise ValueError(f"t_out must be a non-negative int, got {t_out!r}")
    launcher = dispatch.select("slot_index", dest.device)
    if launcher is None:
        return slot_index_reference(dest, t_out)
    return launcher(dest, t_out)


def _check_slots(slots, B: int, T: int, t_out: int, device: torch.device) -> None:
    """``slots`` must be a slot index (order, starts) for a (B, T) map with T' = t_out slots."""
    if slots is None:
        return
    if not isinstance(slots, tuple) or len(slots) != 2:
        raise ValueError("slots must be the (order, starts) pair from mctf_kernels.slot_index")
    for name, t, shape in (("order", slots[0], (B, T)), ("starts", slots[1], (B, t_out + 1))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != torch.int64 or t.device != device:
            raise ValueError(f"slots.{name} must be int64 of shape {shape} on {device}, "
                             f"got {getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}")


def merge(
    x: torch.Tensor,
    dest: torch.Tensor,
    t_out: int,
    size: Optional[torch.Tensor] = None,
    attn_received: Optional[torch.Tensor] = None,
    *,
    mode: int = 1,
    source: Optional[torch.Tensor] = None,
    slots: Optional[SlotIndex] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Pool tokens sharing a slot. Returns (x' (B, T', C), size' (B, T') float32,
    source' (B, T', N) or None). ``size=None`` means all ones. ``slots``: ``slot_index(dest,
    t_out)`` when already computed (the reference does not need it)."""
    check_tokens("x", x)
    B, T, _ = x.shape
    check_dest(dest, B, T, t_out, x.device)
    check_per_token("size", size, B, T, x.device)
    check_per_token("attn_received", attn_received, B, T, x.device)
    check_pooling(mode)
    if mode == 1 and attn_received is None:
        raise ValueError("merge mode 1 (attention-and-size pooling) needs attn_received")
    _check_slots(slots, B, T, t_out, x.device)
    launcher = dispatch.select("merge", x.device)
    if launcher is None:
        return merge_reference(x, dest, t_out, size, attn_received, mode=mode, source=source)
    return launcher(x, dest, t_out, size, attn_received, mode=mode, source=source, slots=slots)


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
    slots: Optional[SlotIndex] = None,
) -> torch.Tensor:
    """One-step-ahead attention output P' @ V' (B, H, T', D) without forming P'
    (except max pooling, whose P' does not factor). ``slots`` as in ``merge``."""
    if not isinstance(attn, torch.Tensor) or attn.dim() != 4:
        raise ValueError(f"attn must be a tensor of shape (B, H, T, T), got {getattr(attn, 'shape', attn)!r}")
    check_pooling(mode)
    if mode == 1 and attn_received is None:
        raise ValueError("mode 1 (attention-and-size pooling) needs attn_received")
    extra = "max pooling forms P' (no fused kernel)" if mode == 2 else None
    if isinstance(dest, torch.Tensor) and dest.dim() == 2:
        _check_slots(slots, dest.shape[0], dest.shape[1], t_out, attn.device)
    launcher = dispatch.select("fused_attention_output", attn.device, extra if dispatch.get_backend() != "reference" else None)
    if launcher is None:
        return fused_attention_output_reference(attn, v, dest, t_out, size, attn_received, mode=mode)
    return launcher(attn, v, dest, t_out, size, attn_received, mode=mode, slots=slots)


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
    slots: Optional[SlotIndex] = None,
) -> torch.Tensor:
    """One-step-ahead output P' @ V' (B, H, T', D) from ``fusion_attention``'s result.
    ``slots`` as in ``merge``."""
    if not isinstance(att, FusionAttention):
        raise TypeError(f"att must be the FusionAttention from fusion_attention, got {type(att).__name__}")
    if att.probs is not None:
        return fused_attention_output(att.probs, v, dest, t_out, size, att.received, mode=mode, slots=slots)
    check_pooling(mode)
    B, H, T, _ = att.q.shape
    if v.dim() != 4 or v.shape[:3] != (B, H, t_out):
        raise ValueError(f"v must have shape (B, H, T', D) = ({B}, {H}, {t_out}, D), got {tuple(v.shape)}")
    check_dest(dest, B, T, t_out, v.device)
    _check_slots(slots, B, T, t_out, v.device)
    launcher = dispatch.select("fused_attention_output_qk", v.device)
    args = (att.q, att.k, att.lse, att.log_size, att.scale, v, dest, t_out, size, att.received)
    if launcher is None:
        return fused_attention_output_qk_reference(*args, mode=mode)
    return launcher(*args, mode=mode, slots=slots)
