"""Triton launcher of ``merge`` (docs/algorithm.md, "Pooling"); the eager reference it
must equal is ``mctf_kernels.merge.merge_reference``.

Layers: ``_merge_kernel`` (one program per block of slots, all channels) <- ``launch_merge``
(slot index unless given, grid, strides; merges (B, T, C) tokens or (B, H, T, C) per-head
rows) <- the ``mctf::merge`` op with its autograd (``_merge_backward_kernel``, launched by
``launch_merge_backward``), and the ``mctf::merge_fused`` op without autograd (the
inference epilogues: LayerNorm per slot or at the tokens, residual + layer scale; docs/
algorithm.md, "One-step-ahead attention") <- ``merge`` (the launcher registered in
``LAUNCHERS``, the reference's arguments plus an optional precomputed ``slots``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..merge import (MergeNorm, merge_norm_reference, merge_reference, merge_residual_reference,  # noqa: F401
                     pooling_weights)
from ._common import custom_op, device_guard, last_dim_unit, wrap
from ._merge_backward_kernel import _merge_backward_kernel
from ._merge_kernel import _merge_kernel
from .configs import merge_backward_config, merge_config
from .slots import launch_slot_index


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


def _promote(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """torch.promote_types of two floating dtypes, in Python (the torch op is a dispatcher call
    that the static report would count as a kernel)."""
    if a == b:
        return a
    return torch.float64 if torch.float64 in (a, b) else torch.float32


def launch_merge(
    x: torch.Tensor,
    dest: torch.Tensor,
    t_out: int,
    size: Optional[torch.Tensor],
    attn_received: Optional[torch.Tensor],
    mode: int,
    source: Optional[torch.Tensor],
    out_dtype: Optional[torch.dtype] = None,
    slots: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    out: Optional[torch.Tensor] = None,
    grouped: bool = False,
    norm: Optional[Tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]] = None,
    norm_at_tokens: bool = False,
    residual: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Merge x (B, T, C) or (B, H, T, C) along T by dest (B, T) in one launch (two
    when ``slots``, the slot index (order, starts) of dest, is not given).

    Returns (x' (..., T', C), size' (B, T') float32, source' (B, T', N) or None,
    den (B, T') float32 = slot sums of the pooling weights; unset for max pooling).
    Tokens whose slot is outside [0, T') are in no slot (mctf_kernels.slots).
    ``out``: where to write x' (its shape, any strides with a unit last dim), e.g. a
    layout the next op reads without a copy. ``grouped``: x is (B, T, G, D) (any strides,
    unit last): its G groups of D channels are merged as one row of C = G * D, out (B, T', C).
    ``norm = (weight, bias, eps, normed)``: also write LayerNorm(x') into ``normed`` (B, T', C)
    (3-d x only), each row normalised by the program that pooled it; ``norm_at_tokens``:
    ``normed`` is (B, T, C) and each token's row is its slot's (zeros for a token in no slot).
    ``residual = (res, scale)``: x' becomes res + scale * x' (res (B, T', C), scale (C,) or
    None; 3-d x, weighted modes), rounded as ``merge_residual_reference``; out's dtype is
    torch's result dtype of that expression.
    """
    x = last_dim_unit(x)
    group, sxg = 0, 0
    if grouped:
        B, T, G, group = x.shape
        C = G * group
        H, sxb, sxh, sxt, sxg, sxc = 1, x.stride(0), 0, x.stride(1), x.stride(2), x.stride(3)
    elif x.dim() == 3:
        B, T, C = x.shape
        H, sxb, sxh, sxt, sxc = 1, x.stride(0), 0, x.stride(1), x.stride(2)
    else:
        B, H, T, C = x.shape
        sxb, sxh, sxt, sxc = x.stride()
    device = x.device
    # the kernel indexes dense rows of order and starts: a caller's view is copied if it is not
    order, starts = (s.contiguous() for s in slots) if slots is not None else launch_slot_index(dest, t_out)

    lead = (B,) if grouped else tuple(x.shape[:-2])
    has_residual = residual is not None
    if has_residual:
        if grouped or x.dim() != 3 or mode == 2:
            raise ValueError("residual= merges (B, T, C) tokens with a weighted pooling mode (0, 1, 3)")
        res, scale = residual
        if tuple(res.shape) != (B, t_out, C) or (scale is not None and tuple(scale.shape) != (C,)):
            raise ValueError(f"residual must be ({B}, {t_out}, {C}) and its scale ({C},)")
        res = last_dim_unit(res)
        scaled_dtype = x.dtype if scale is None else _promote(x.dtype, scale.dtype)
        out_dtype = _promote(res.dtype, scaled_dtype)
        wide = torch.float64 in (x.dtype, res.dtype, scaled_dtype)
        scale_arg = scale.contiguous() if scale is not None else res  # placeholder, never read
        residual_args = (res, res.stride(0), res.stride(1), scale_arg)
        epi = dict(HAS_RESIDUAL=True, HAS_SCALE=scale is not None, SCALED_DTYPE=_TL_DTYPES[scaled_dtype],
                   EPI_DTYPE=tl.float64 if wide else tl.float32)
    else:
        residual_args = (x, 0, 0, x)  # placeholders, never read
        epi = dict(EPI_DTYPE=tl.float64 if x.dtype == torch.float64 else tl.float32)
    if out is None:
        out = torch.empty(*lead, t_out, C, device=device, dtype=out_dtype or x.dtype)
    elif tuple(out.shape) != (*lead, t_out, C) or out.stride(-1) != 1:
        raise ValueError(f"out must have shape {(*lead, t_out, C)} and a unit last stride")
    sob, soh, sot = (out.stride(0), 0, out.stride(1)) if out.dim() == 3 else out.stride()[:3]
    new_size = torch.empty(B, t_out, device=device, dtype=torch.float32)
    # float64 x: the weight sums stay float64, so the backward divides by the forward's own sums
    den = torch.empty(B, t_out, device=device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)

    has_size = size is not None
    size_arg, ss = (size, size.stride()) if has_size else (new_size, (0, 0))  # placeholder, never read
    if mode == 1:
        if attn_received is None:
            raise ValueError("pooling mode 1 (attention-and-size) needs attn_received")
        attn_arg, sa = attn_received, attn_received.stride()
    else:
        attn_arg, sa = new_size, (0, 0)

    has_source = source is not None
    if has_source:
        N = source.shape[-1]
        source = last_dim_unit(source)
        new_source = torch.empty(B, t_out, N, device=device, dtype=source.dtype)
        src_arg, sn = source, source.stride()
    else:
        N = 0
        new_source = None
        src_arg, sn = new_size, (0, 0, 0)
    if B * H * t_out == 0:
        return out, new_size, new_source, den

    has_norm = norm is not None
    if has_norm:
        if grouped or x.dim() != 3:
            raise ValueError("norm= merges (B, T, C) tokens only")
        norm_w, norm_b, eps, normed = norm
        rows = T if norm_at_tokens else t_out
        if tuple(normed.shape) != (B, rows, C) or normed.stride(-1) != 1:
            raise ValueError(f"normed must have shape {(B, rows, C)} and a unit last stride")
        norm_w, norm_b = norm_w.contiguous(), norm_b.contiguous()  # indexed by channel, unit stride
        norm_args = (norm_w, norm_b, normed, normed.stride(0), normed.stride(1), float(eps))
    else:
        norm_args = (new_size, new_size, new_size, 0, 0, 0.0)  # placeholders, never read
    cfg = merge_config(device, B * H, T, t_out, C, N, whole_rows=has_norm)
    # at the tokens, one more slot (T': the tokens in no slot, zero rows; see the kernel)
    n_slots = t_out + 1 if has_norm and norm_at_tokens else t_out
    grid = (B * H * triton.cdiv(n_slots, cfg["BLOCK_S"]), cfg["SPLIT_C"])
    wrap(_merge_kernel)[grid](
        x, sxb, sxh, sxt, sxc, sxg,
        order, starts,
        size_arg, ss[0], ss[1],
        attn_arg, sa[0], sa[1],
        src_arg, sn[0], sn[1], sn[2],
        out, sob, soh, sot,
        new_size, den, new_source if has_source else new_size,
        *norm_args,
        *residual_args,
        H, T, t_out, C, N,
        MODE=mode, HAS_SIZE=has_size, HAS_SOURCE=has_source,
        ACC_DTYPE=tl.float64 if x.dtype == torch.float64 else tl.float32, GROUP_C=group, HAS_NORM=has_norm,
        NORM_AT_TOKENS=has_norm and norm_at_tokens,
        EVEN_C=has_norm and cfg["BLOCK_C"] * cfg.get("NCHUNK", 1) == C, **epi,
        **cfg,
    )
    return out, new_size, new_source, den


# ---------------------------------------------------------------- backward

def launch_merge_backward(
    grad_out: torch.Tensor,
    x: Optional[torch.Tensor],
    out: Optional[torch.Tensor],
    dest: torch.Tensor,
    den: torch.Tensor,
    size: Optional[torch.Tensor],
    attn_received: Optional[torch.Tensor],
    mode: int,
    x_dtype: torch.dtype,
    slots: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """d x' / d x for x (B, [H,] T, C) in one launch (two when ``slots`` is not given):
    ``_merge_backward_kernel``, the gathers of the reference's scatters.

    Weighted: grad_x[t] = grad[dest t] * w_t / W[dest t], where a slot whose weights sum
    to 0 (``den`` == 0, the forward kernel's own sums) has w_t = 1 and W = its member
    count. Max: the slot's gradient is split evenly among the members equal to its
    maximum (x and out are read for that). Weights carry no gradient (as in the
    reference). Tokens whose slot is outside [0, T') are in no slot: gradient 0.
    """
    grad_out = last_dim_unit(grad_out)
    B, T = dest.shape
    C = grad_out.shape[-1]
    lead = grad_out.shape[:-2]
    H = 1 if grad_out.dim() == 3 else grad_out.shape[1]
    grad_x = torch.empty(*lead, T, C, device=grad_out.device, dtype=x_dtype)
    if grad_x.numel() == 0:
        return grad_x
    order, starts = (s.contiguous() for s in slots) if slots is not None else launch_slot_index(dest, grad_out.shape[-2])

    def strides4(t):  # (b, h, t, c) strides of a (B, T, C) or (B, H, T, C) tensor
        return (t.stride(0), 0, t.stride(1), t.stride(2)) if t.dim() == 3 else t.stride()

    if mode == 2:
        x_arg, out_arg = last_dim_unit(x), out
    else:
        x_arg = out_arg = grad_out  # placeholders, never read
    has_size = size is not None
    size_arg, ss = (size, size.stride()) if has_size else (den, (0, 0))
    attn_arg, sa = (attn_received, attn_received.stride()) if mode == 1 else (den, (0, 0))
    cfg = merge_backward_config(grad_out.device, B * H, T, C, mode)
    grid = (B * H * triton.cdiv(T, cfg["BLOCK_T"]), cfg["SPLIT_C"])
    with device_guard(grad_out):
        wrap(_merge_backward_kernel)[grid](
            grad_out, *strides4(grad_out),
            x_arg, *strides4(x_arg),
            out_arg, *strides4(out_arg),
            dest, *dest.stride(),
            order, starts, den,
            size_arg, *ss,
            attn_arg, *sa,
            grad_x, *strides4(grad_x)[:3],
            H, T, grad_out.shape[-2], C,
            MODE=mode, HAS_SIZE=has_size,
            ACC_DTYPE=tl.float64 if grad_out.dtype == torch.float64 or x_dtype == torch.float64 else tl.float32,
            **cfg,
        )
    return grad_x


# ---------------------------------------------------------------- op + autograd

def _merge_impl(
    x: torch.Tensor,
    dest: torch.Tensor,
    t_out: int,
    size: Optional[torch.Tensor],
    attn_received: Optional[torch.Tensor],
    mode: int,
    source: Optional[torch.Tensor],
    order: Optional[torch.Tensor],
    starts: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    slots = None if order is None else (order, starts)
    with device_guard(x):  # Triton launches on the current device, not the tensors'
        out, new_size, new_source, den = launch_merge(x, dest, t_out, size, attn_received, mode, source, slots=slots)
    if new_source is None:  # custom ops cannot return None
        new_source = x.new_empty(0)
    return out, new_size, new_source, den


def _setup_context(ctx, inputs, output) -> None:
    x, dest, _t_out, size, attn_received, mode, _source, order, starts = inputs
    out, _new_size, _new_source, den = output
    ctx.mode = mode
    ctx.x_dtype = x.dtype
    # the slot index travels to the backward when the caller gave one (the model layer does)
    if mode == 2:
        ctx.save_for_backward(x, out, dest, den, None, None, order, starts)
    else:
        ctx.save_for_backward(None, None, dest, den, size, attn_received, order, starts)


def _backward(ctx, grad_out, _g_size, _g_source, _g_den):
    x, out, dest, den, size, attn_received, order, starts = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        slots = None if order is None else (order, starts)
        grad_x = launch_merge_backward(grad_out, x, out, dest, den, size, attn_received, ctx.mode, ctx.x_dtype,
                                       slots=slots)
    return grad_x, None, None, None, None, None, None, None, None


merge_op = custom_op("merge", _merge_impl, _backward, _setup_context)


def _merge_fused_impl(
    x: torch.Tensor,
    dest: torch.Tensor,
    t_out: int,
    size: Optional[torch.Tensor],
    attn_received: Optional[torch.Tensor],
    mode: int,
    source: Optional[torch.Tensor],
    order: Optional[torch.Tensor],
    starts: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    residual_scale: Optional[torch.Tensor],
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    eps: float,
    norm_dtype: torch.dtype,
    at_tokens: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    slots = None if order is None else (order, starts)
    B, T, C = x.shape
    norm = None
    normed = x.new_empty(0)  # custom ops cannot return None
    if norm_weight is not None:
        normed = torch.empty(B, T if at_tokens else t_out, C, device=x.device, dtype=norm_dtype)
        norm = (norm_weight, norm_bias, eps, normed)
    with device_guard(x):
        out, new_size, new_source, _den = launch_merge(
            x, dest, t_out, size, attn_received, mode, source, slots=slots, norm=norm, norm_at_tokens=at_tokens,
            residual=None if residual is None else (residual, residual_scale))
    if new_source is None:
        new_source = x.new_empty(0)
    return out, new_size, new_source, normed


# No autograd: taken only when no gradient is needed (``merge`` checks), else the
# differentiable merge followed by the epilogues as torch ops.
merge_fused_op = custom_op("merge_fused", _merge_fused_impl)


def merge(
    x: torch.Tensor,
    dest: torch.Tensor,
    t_out: int,
    size: Optional[torch.Tensor] = None,
    attn_received: Optional[torch.Tensor] = None,
    *,
    mode: int = 1,
    source: Optional[torch.Tensor] = None,
    slots: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    norm: Optional[MergeNorm] = None,
    residual: Optional[torch.Tensor] = None,
    residual_scale: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, ...]:
    """Triton ``merge``: (x' (B, T', C), size' (B, T') float32, source' (B, T', N) or None),
    and with ``norm`` LayerNorm(x') in ``norm.dtype`` (per slot, or at the token positions
    with ``norm.at_tokens``). With ``residual``, x' is ``residual + residual_scale * x'``
    (the norm is of that). Without a gradient to compute, the merge kernel does all of it in
    one launch; otherwise the epilogues are torch ops on the merge's output (differentiable).

    ``slots``: dest's slot index (order, starts) when already computed (``slot_index``)."""
    B, T, _ = x.shape
    if mode == 1 and attn_received is None:
        raise ValueError("pooling mode 1 (attention-and-size) needs attn_received")
    if source is not None:
        if source.dim() != 3 or source.shape[:2] != (B, T):
            raise ValueError(f"source must have shape (B, T, N) with (B, T) = ({B}, {T}), got {tuple(source.shape)}")
        if source.device != x.device:
            raise ValueError(f"source is on {source.device} but the tokens are on {x.device}")
    if residual is not None and mode == 2:
        raise ValueError("residual= needs a weighted pooling mode (0, 1, 3); max pooling (mode 2) has no residual "
                         "epilogue (it does not commute with the projection before it)")
    order, starts = (None, None) if slots is None else slots
    operands = (x, residual, residual_scale) + (() if norm is None else (norm.weight, norm.bias))
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in operands)
    if (norm is not None or residual is not None) and not wants_grad:
        has_norm = norm is not None
        out, new_size, new_source, normed = merge_fused_op(
            x, dest, t_out, size, attn_received, mode, source, order, starts, residual, residual_scale,
            norm.weight if has_norm else None, norm.bias if has_norm else None, float(norm.eps) if has_norm else 0.0,
            norm.dtype if has_norm else x.dtype, bool(has_norm and norm.at_tokens))
        merged = (out, new_size, (new_source if source is not None else None))
        return merged if norm is None else (*merged, normed)
    out, new_size, new_source, _den = merge_op(x, dest, t_out, size, attn_received, mode, source, order, starts)
    if residual is not None:
        out = merge_residual_reference(out, residual, residual_scale)
    merged = (out, new_size, (new_source if source is not None else None))
    return merged if norm is None else (*merged, merge_norm_reference(out, norm, dest))
