"""Triton launchers of the flash-style one-step-ahead attention (SPEC section 6):
``fusion_attention`` and ``fused_attention_output_qk``. Their eager references are
``fusion_attention_reference`` and ``fused_attention_output_qk_reference`` in
``mctf_kernels.attention``.

The (B, H, T, T) attention is never written to memory:

- ``fusion_attention`` (``mctf::fusion_attention``): launch 1 computes each query's
  log-sum-exp ``lse`` (B, H, T) over key blocks with an online max / sum; launch 2
  recomputes P = exp(s - lse) per key block and sums it over the queries (per head);
  the heads are summed in a fixed order, so ``received`` is deterministic.
- ``fused_attention_output_qk`` (``mctf::fused_attention_output_qk``): the kernel of
  ``fused_attention_output`` with ``FROM_QK``, recomputing each P tile from q, k and
  ``lse`` instead of loading it.

Logits are ``(q * scale rounded to q's dtype) @ k^T`` accumulated in float32, plus
``log_size`` on each key in float32; softmax in float32. The reference rounds logits
and probabilities to q's dtype, so for half-precision models the kernels are the more
accurate of the two.

Autograd: ``fusion_attention``'s outputs (``received``, ``lse``) carry no gradient
(they drive the matching under no_grad); the op runs on detached q, k, and the
returned ``FusionAttention`` keeps the original q, k so that
``fused_attention_output_qk`` differentiates through them. That op's backward is
eager: it recomputes the explicit softmax from q, k with torch autograd (float32, or
float64 for float64 inputs) and reuses ``fused_attention_output``'s deterministic
backward for the P @ V' part. ``lse``, ``log_size``, ``size`` and ``attn_received``
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
from ._flash_attention_kernel import _attention_lse_kernel, _attention_received_qk_kernel
from .attention import _pv_precision, check_output_args, fused_attention_output_backward, launch_fused_output
from ._common import block_size, custom_op, interpreting, last_dim_unit, wrap

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _qk_blocks(D: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) of the two fusion_attention launches."""
    BLOCK_D = block_size(D, 256)
    if interpreting():  # one numpy op per program: fewest, largest programs
        return 128, 128, BLOCK_D, 4
    if BLOCK_D <= 64:
        return 64, 64, BLOCK_D, 4
    return 64, 32, BLOCK_D, 8


def _launch_lse(q, k, log_size, scale) -> torch.Tensor:
    """Per-query log-sum-exp of the logits (B, H, T) float32 (launch 1)."""
    B, H, T, D = q.shape
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    has_log_size = log_size is not None
    logs_arg, sl = (log_size, log_size.stride()) if has_log_size else (lse, (0, 0))
    BLOCK_M, BLOCK_N, BLOCK_D, warps = _qk_blocks(D)
    grid = (B * H, triton.cdiv(T, BLOCK_M))
    wrap(_attention_lse_kernel)[grid](
        q, *q.stride(), k, *k.stride(), logs_arg, *sl, lse, float(scale), H, T, D,
        HAS_LOG_SIZE=has_log_size, QK_PRECISION=_pv_precision(q.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=warps,
    )
    return lse


# ---------------------------------------------------------------- fusion_attention

def _fusion_attention_impl(
    q: torch.Tensor, k: torch.Tensor, log_size: Optional[torch.Tensor], scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    q, k = last_dim_unit(q), last_dim_unit(k)
    B, H, T, D = q.shape
    lse = _launch_lse(q, k, log_size, scale)
    part = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    has_log_size = log_size is not None
    logs_arg, sl = (log_size, log_size.stride()) if has_log_size else (lse, (0, 0))
    BLOCK_M, BLOCK_N, BLOCK_D, warps = _qk_blocks(D)
    grid = (B * H, triton.cdiv(T, BLOCK_N))
    wrap(_attention_received_qk_kernel)[grid](
        q, *q.stride(), k, *k.stride(), logs_arg, *sl, lse, part, float(scale), H, T, D,
        HAS_LOG_SIZE=has_log_size, QK_PRECISION=_pv_precision(q.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=warps,
    )
    # Heads summed in a fixed order (deterministic, no atomics).
    return part.sum(dim=1) / (H * T), lse


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
) -> Tuple[torch.Tensor, torch.Tensor]:
    q, k = last_dim_unit(q), last_dim_unit(k)
    if lse is None:
        lse = _launch_lse(q, k, log_size, scale)
    return launch_fused_output(v, dest, t_out, size, attn_received, mode, qk=(q, k, lse, log_size, scale))


def _fused_qk_setup(ctx, inputs, output) -> None:
    q, k, _lse, log_size, scale, v, dest, t_out, size, attn_received, mode = inputs
    _out, den = output
    ctx.scale, ctx.mode = scale, mode
    ctx.save_for_backward(q, k, v, dest, den, log_size, size, attn_received)


def _fused_qk_backward(ctx, grad_out, _grad_den):
    q, k, v, dest, den, log_size, size, attn_received = ctx.saved_tensors
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.enable_grad():
        q_ = q.detach().to(dtype).requires_grad_(True)
        k_ = k.detach().to(dtype).requires_grad_(True)
        probs = attention_logits_reference(q_, k_, ctx.scale, log_size).softmax(dim=-1)
    # P @ V' part: fused_attention_output's backward (float32, deterministic one-hot matmuls).
    grad_p, grad_v = fused_attention_output_backward(
        grad_out, probs.detach(), v, dest, den, size, attn_received, ctx.mode
    )
    grad_q, grad_k = torch.autograd.grad(probs, (q_, k_), grad_p.to(dtype))
    return grad_q.to(q.dtype), grad_k.to(k.dtype), None, None, None, grad_v, None, None, None, None, None


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
    slots=None,  # placeholder: the attention branch uses a precomputed slot index
) -> torch.Tensor:
    """Triton ``fused_attention_output_qk``: P' @ V' (B, H, T', D) for pooling modes 0, 1, 3,
    recomputing P from q, k (and ``lse``; computed here when None)."""
    _check_qk(q, k, log_size)
    B, H, T, _ = q.shape
    check_output_args("fused_attention_output_qk", (B, H, T), v, dest, t_out, size, attn_received, mode, q.device)
    if lse is not None and (tuple(lse.shape) != (B, H, T) or lse.dtype != torch.float32 or lse.device != q.device):
        raise ValueError(f"lse must be float32 of shape (B, H, T) = ({B}, {H}, {T}) on {q.device}")
    detach = (lambda t: None if t is None else t.detach())
    out, _den = fused_qk_op(q, k, detach(lse), detach(log_size), float(scale), v, dest, t_out,
                            detach(size), detach(attn_received), mode)
    return out
