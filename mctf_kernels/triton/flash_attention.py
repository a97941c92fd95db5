"""Triton launchers of the flash-style one-step-ahead attention (docs/algorithm.md,
"One-step-ahead attention"): ``fusion_attention`` and ``fused_attention_output_qk``.
Their eager references are ``fusion_attention_reference`` and
``fused_attention_output_qk_reference`` in ``mctf_kernels.attention``.

The (B, H, T, T) attention is never written to memory. Per fused layer q.k^T is
computed twice for T <= 256 (three times above: the received kernel then loops twice):

- ``fusion_attention`` (``mctf::fusion_attention``): one launch computes each query's
  log-sum-exp ``lse`` (B, H, T) and ``received``: one program per image when the batch
  fills the GPU (T <= 256), otherwise per-query-block column sums of P added by one
  ``sum`` in a fixed order (deterministic either way, no atomics).
- ``fused_attention_output_qk`` (``mctf::fused_attention_output_qk``): one launch of
  ``fused_attention_output``'s kernel with ``FROM_QK``, recomputing each P tile from q,
  k and ``lse`` over the queries in slot order.

Logits are ``(q * scale rounded to q's dtype) @ k^T`` accumulated in float32 (tensor
cores for half inputs), plus ``log_size`` on each key in float32; softmax in float32.
The reference rounds logits and probabilities to q's dtype, so for half-precision
models the kernels are the more accurate of the two.

Autograd: ``fusion_attention``'s outputs (``received``, ``lse``) carry no gradient
(they drive the matching under no_grad); the op runs on detached q, k, and the
returned ``FusionAttention`` keeps the original q, k so that
``fused_attention_output_qk`` differentiates through them. That op's backward is
flash-style Triton (``attention_backward.py``): P recomputed tile by tile from q, k and
``lse``, never formed. ``lse``, ``log_size``, ``size`` and ``attn_received``
are treated as constants (the output is a function of q, k, v only; the given
``lse`` is the one q, k imply).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from ..attention import (  # noqa: F401  (the references beside their launchers)
    FusionAttention,
    attention_logits_reference,
    fused_attention_output_qk_reference,
    fusion_attention_reference,
)
from . import configs
from ._common import custom_op, device_guard, last_dim_unit, wrap
from ._flash_attention_kernel import _attention_lse_received_kernel
from .attention import _pv_precision, check_output_args, check_slots, launch_fused_output
from .attention_backward import launch_fused_qk_backward

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _launch_lse_received(q, k, log_size, scale, want_received: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """One launch: lse (B, H, T) float32 and ``received`` (B, T) float32. With
    ``PER_IMAGE`` the kernel writes ``received`` itself; otherwise it writes per-(head,
    query block) column sums, already divided by H * T, and one ``sum`` adds them in a
    fixed order (skipped when not ``want_received``: then the partials come back).
    Either way ``received`` is bit-identical run to run (no atomics)."""
    B, H, T, D = q.shape
    gpu = configs.gpu_configs(q.device)
    cfg = configs.attention_received_qk_config(T, D, gpu, q.dtype in (torch.float32, torch.float64), batch=B,
                                               sms=configs.sm_count(q.device))
    n_mb = triton.cdiv(T, cfg["BLOCK_M"])
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    if cfg["PER_IMAGE"]:
        grid, part = (B,), torch.empty(B, T, device=q.device, dtype=torch.float32)
    else:
        grid, part = (B * H, n_mb), torch.empty(B, H * n_mb, T, device=q.device, dtype=torch.float32)
    has_log_size = log_size is not None
    logs_arg, sl = (log_size, log_size.stride()) if has_log_size else (lse, (0, 0))
    with device_guard(q):
        wrap(_attention_lse_received_kernel)[grid](
            q, *q.stride(), k, *k.stride(), logs_arg, *sl, lse, part, float(scale), 1.0 / (H * T), H, T, D,
            HAS_LOG_SIZE=has_log_size, QK_PRECISION=_pv_precision(q.dtype),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], ONE_TILE=cfg["ONE_TILE"],
            PER_IMAGE=cfg["PER_IMAGE"], num_warps=cfg["num_warps"],
            **{n: cfg[n] for n in ("num_stages", "maxnreg") if cfg[n] is not None},
        )
    # Heads and query blocks summed in a fixed order (deterministic, no atomics).
    return lse, part if cfg["PER_IMAGE"] or not want_received else part.sum(dim=1)


# ---------------------------------------------------------------- fusion_attention

def _fusion_attention_impl(
    q: torch.Tensor, k: torch.Tensor, log_size: Optional[torch.Tensor], scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    q, k = last_dim_unit(q), last_dim_unit(k)
    lse, received = _launch_lse_received(q, k, log_size, scale)
    return received, lse


# ---------------------------------------------------------------- fused_attention_output_qk

def _fused_qk_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: Optional[torch.Tensor],
    log_size: Optional[torch.Tensor],
    scale: float,
    v: torch.Tensor,
    dest: torch.Tensor,
    t_out: int,
    size: Optional[torch.Tensor],
    attn_received: Optional[torch.Tensor],
    mode: int,
    order: Optional[torch.Tensor],
    starts: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    q, k = last_dim_unit(q), last_dim_unit(k)
    if lse is None:
        lse, _unused = _launch_lse_received(q, k, log_size, scale, want_received=False)
    slots = None if order is None else (order, starts)
    return launch_fused_output(v, dest, t_out, size, attn_received, mode, qk=(q, k, lse, log_size, scale),
                               slots=slots)


def _fused_qk_setup(ctx, inputs, output) -> None:
    q, k, lse, log_size, scale, v, dest, t_out, size, attn_received, mode, order, starts = inputs
    _out, den = output
    ctx.scale, ctx.mode = scale, mode
    # lse and the slot index travel to the backward when the caller gave them (the model layer does)
    ctx.save_for_backward(q, k, lse, v, dest, den, log_size, size, attn_received, order, starts)


def _fused_qk_backward(ctx, grad_out, _grad_den):
    q, k, lse, v, dest, den, log_size, size, attn_received, order, starts = ctx.saved_tensors
    q, k = last_dim_unit(q), last_dim_unit(k)
    if lse is None:
        lse, _unused = _launch_lse_received(q, k, log_size, ctx.scale, want_received=False)
    grad_q, grad_k, grad_v = launch_fused_qk_backward(
        grad_out, q, k, lse, log_size, ctx.scale, v, dest, den, size, attn_received, ctx.mode,
        slots=None if order is None else (order, starts))
    return grad_q, grad_k, None, None, None, grad_v, None, None, None, None, None, None, None


fusion_attention_op = custom_op("fusion_attention", _fusion_attention_impl)
fused_qk_op = custom_op("fused_attention_output_qk", _fused_qk_impl, _fused_qk_backward, _fused_qk_setup)


def _check_qk(q: torch.Tensor, k: torch.Tensor, log_size: Optional[torch.Tensor]) -> None:
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape (B, H, T, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.dtype != k.dtype or q.dtype not in _FLOATS:
        raise ValueError(f"q and k must share a floating dtype, got {q.dtype} and {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k is on {k.device} but q is on {q.device}")
    B, _, T, _ = q.shape
    if log_size is not None and (tuple(log_size.shape) != (B, T) or log_size.device != q.device):
        raise ValueError(f"log_size must have shape (B, T) = ({B}, {T}) on {q.device}")


def fusion_attention(
    q: torch.Tensor, k: torch.Tensor, *, scale: float, log_size: Optional[torch.Tensor] = None
) -> FusionAttention:
    """Triton ``fusion_attention``: each query's log-sum-exp and the attention each token
    receives, without forming P. ``received`` and ``lse`` carry no gradient."""
    _check_qk(q, k, log_size)
    received, lse = fusion_attention_op(
        q.detach(), k.detach(), None if log_size is None else log_size.detach(), float(scale)
    )
    return FusionAttention(received=received, probs=None, q=q, k=k, lse=lse, log_size=log_size, scale=float(scale))


def fused_attention_output_qk(
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
    slots: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Triton ``fused_attention_output_qk``: P' @ V' (B, H, T', D) for pooling modes 0, 1, 3,
    recomputing P from q, k (and ``lse``; computed here when None). ``slots`` is the slot
    index ``(order, starts)`` of ``dest`` (``slot_index(dest, t_out)``) when the caller
    already has it. The result is a (B, H, T', D) view of (B, T', H, D) storage, the
    layout the output projection reads."""
    _check_qk(q, k, log_size)
    B, H, T, _ = q.shape
    check_output_args("fused_attention_output_qk", (B, H, T), v, dest, t_out, size, attn_received, mode, q.device)
    if lse is not None and (tuple(lse.shape) != (B, H, T) or lse.dtype != torch.float32 or lse.device != q.device):
        raise ValueError(f"lse must be float32 of shape (B, H, T) = ({B}, {H}, {T}) on {q.device}")
    detach = (lambda t: None if t is None else t.detach())
    order, starts = check_slots(slots, B, T, t_out, q.device)
    out, _den = fused_qk_op(q, k, detach(lse), detach(log_size), float(scale), v, dest, t_out,
                            detach(size), detach(attn_received), mode, order, starts)
    return out
