"""Triton launchers of the flash-style one-step-ahead attention (docs/algorithm.md,
"One-step-ahead attention"): ``fusion_attention`` and ``fused_attention_output_qk``.
Their eager references are ``fusion_attention_reference`` and
``fused_attention_output_qk_reference`` in ``mctf_kernels.attention``.

The (B, H, T, T) attention is never written to memory. Per fused layer q.k^T is
computed twice for T <= 256 (three times above: the received kernel then loops twice):

- ``fusion_attention`` (``mctf::fusion_attention``): one launch computes each query's
  log-sum-exp ``lse`` (B, H, T) and ``received``: one program per image when the batch
  fills the GPU (T <= 256), otherwise per-query-block column sums of P added by one
  ``sum`` in a fixed order (deterministic either way, no atomics). Given the token sizes
  (``size=``, the model's inference flow) the same launch takes their log and writes the
  output attention's log-size mask (``FusionAttention.mask``), which
  ``mctf_kernels.fusion_attention_rows`` hands to torch's fused attention on values at
  the T token rows (the model then projects and row-merges those rows).
- ``fused_attention_output_qk`` (``mctf::fused_attention_output_qk``): P' @ V' =
  rowmerge(P @ V'[dest]) as three kernels: ``_gather_values_kernel`` writes V'[dest]
  and the log-size mask, torch's fused attention (``scaled_dot_product_attention``,
  FlashAttention-class kernels on a GPU) computes P @ V'[dest] over the pre-fusion
  keys, and the merge kernel pools the query rows into their slots (merge's weights,
  zero-weight and NaN rules) straight into the (B, T', H, D) layout ``proj`` reads.
  The static sm_90 report estimates this at a fraction of the single fused Triton
  kernel it replaced (bench/NOTES.md, section 3); ``_fused_attention_output_kernel``
  serves only ``fused_attention_output`` (P formed: training with attention dropout).

Logits in ``fusion_attention`` are ``(q * scale rounded to q's dtype) @ k^T`` accumulated
in float32 (tensor cores for half inputs), plus ``log_size`` on each key in float32
(given sizes: the kernel's float32 log, within the last bit of ``torch.log``);
softmax in float32. The output's attention takes ``log_size`` rounded to q's dtype as its
mask, as the reference adds it to logits in q's dtype; torch's kernel applies ``scale``
inside. For half-precision models both kernels are at least as accurate as the reference.

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
import torch.nn.functional as F
import triton

from ..attention import (  # noqa: F401  (the references beside their launchers)
    FusionAttention,
    attention_logits_reference,
    fused_attention_output_qk_reference,
    fusion_attention_reference,
)
from . import configs
from ._common import custom_op, device_guard, interpreting, last_dim_unit, wrap
from ._flash_attention_kernel import _attention_lse_received_kernel, _gather_values_kernel
from .._checks import check_slot_index
from .attention import _pv_precision, check_output_args
from .attention_backward import launch_fused_qk_backward
from .merge import launch_merge
from .slots import launch_slot_index

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _launch_lse_received(q, k, log_size, scale, want_received: bool = True, size=None):
    """One launch: lse (B, H, T) float32, ``received`` (B, T) float32 and, given ``size``
    (whose log the kernel takes; then ``log_size`` is None), the output attention's
    additive mask: (B, T rounded up to 16) in q's dtype, rows padded so that torch's
    attention takes a (B, 1, 1, T) view of it as it is (no aligned copy); else None.
    With ``PER_IMAGE`` the kernel writes ``received`` itself; otherwise it writes
    per-(head, query block) column sums, already divided by H * T, and one ``sum`` adds
    them in a fixed order (skipped when not ``want_received``: then the partials come
    back). Either way ``received`` is bit-identical run to run (no atomics)."""
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
    mask = (torch.empty(B, triton.cdiv(max(T, 1), 16) * 16, device=q.device, dtype=q.dtype)
            if size is not None else None)
    if size is not None and not cfg["ONE_TILE"]:
        # two loops over key tiles would take each key's log once per loop in every (head, query
        # block) program (the report: about +40% instructions at T = 577); one torch log is cheaper
        size, log_size = None, size.log()
    bias_src = log_size if size is None else size
    has_log_size = bias_src is not None
    logs_arg, sl = (bias_src, bias_src.stride()) if has_log_size else (lse, (0, 0))
    mask_arg = lse if mask is None else mask
    with device_guard(q):
        wrap(_attention_lse_received_kernel)[grid](
            q, *q.stride(), k, *k.stride(), logs_arg, *sl, lse, mask_arg, mask_arg.stride(0), part, float(scale),
            1.0 / (H * T), H, T, D,
            HAS_LOG_SIZE=has_log_size, SIZE_GIVEN=size is not None, WRITE_MASK=mask is not None,
            USE_LIBDEVICE=q.device.type == "cuda" and not interpreting(), QK_PRECISION=_pv_precision(q.dtype),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], ONE_TILE=cfg["ONE_TILE"],
            PER_IMAGE=cfg["PER_IMAGE"], num_warps=cfg["num_warps"],
            **{n: cfg[n] for n in ("num_stages", "maxnreg") if cfg[n] is not None},
        )
    # Heads and query blocks summed in a fixed order (deterministic, no atomics).
    return lse, part if cfg["PER_IMAGE"] or not want_received else part.sum(dim=1), mask


# ---------------------------------------------------------------- fusion_attention

def _fusion_attention_impl(
    q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor], scale: float, bias_is_size: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # ``bias``: the sizes (``bias_is_size``: the kernel takes their log and writes the mask)
    # or log_size. The mask comes back padded, (B, 0) when there is none (an op returns tensors).
    q, k = last_dim_unit(q), last_dim_unit(k)
    size, log_size = (bias, None) if bias_is_size else (None, bias)
    lse, received, mask = _launch_lse_received(q, k, log_size, scale, size=size)
    return received, lse, q.new_empty(q.shape[0], 0) if mask is None else mask


# ---------------------------------------------------------------- fused_attention_output_qk

def launch_gather_values(v: torch.Tensor, dest: torch.Tensor, log_size: Optional[torch.Tensor],
                         bias_dtype: torch.dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One launch: V'[dest] (B, H, T, D), a view of (B, T, H, D) storage (zero rows where
    a slot is outside [0, T')), and log_size in ``bias_dtype`` as a (B, 1, 1, T) additive
    mask (None without log_size). The mask's rows are padded to 16 elements so that the
    attention kernel takes it as it is (no aligned copy)."""
    B, H, t_out, D = v.shape
    T = dest.shape[1]
    vg = torch.empty(B, T, H, D, device=v.device, dtype=v.dtype)
    has_log_size = log_size is not None
    bias = torch.empty(B, triton.cdiv(max(T, 1), 16) * 16, device=v.device, dtype=bias_dtype) if has_log_size else None
    if B * T > 0:
        cfg = configs.gather_values_config(T, D, configs.gpu_configs(v.device))
        logs_arg, sl = (log_size, log_size.stride()) if has_log_size else (vg, (0, 0))
        bias_arg = bias if has_log_size else vg
        grid = (B, triton.cdiv(T, cfg["BLOCK_T"]))
        wrap(_gather_values_kernel)[grid](
            v, *v.stride(), dest, *dest.stride(), logs_arg, *sl, vg, bias_arg, bias_arg.stride(0), H, T, t_out, D,
            HAS_LOG_SIZE=has_log_size, **cfg,
        )
    return vg.transpose(1, 2), (None if bias is None else bias[:, None, None, :T])


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
    # P' @ V' = rowmerge(P @ V'[dest]): three launches, no P formed. (1) gather V'[dest] and
    # the log-size mask; (2) torch's fused attention on q, k, V'[dest] (P is softmax over the
    # pre-fusion keys; ``lse`` is only the backward's); (3) the merge kernel pools the query rows
    # into their slots with merge's weights, zero-weight and NaN rules, and gives den.
    q, k, v = last_dim_unit(q), last_dim_unit(k), last_dim_unit(v)
    B, H, T, _ = q.shape
    D = v.shape[-1]
    with device_guard(q):
        order, starts = launch_slot_index(dest, t_out) if order is None else (order, starts)
        vg, bias = launch_gather_values(v, dest, log_size, q.dtype)
        rows = F.scaled_dot_product_attention(q, k, vg, attn_mask=bias, scale=float(scale))
        out = torch.empty(B, t_out, H, D, device=v.device, dtype=v.dtype)
        # rows (B, H, T, D) in whatever layout the attention backend chose, read as (B, T, H, D):
        # one merge program covers every head of its slots (the weights are computed once)
        _out, _size, _src, den = launch_merge(rows.transpose(1, 2), dest, t_out, size, attn_received, mode, None,
                                              slots=(order, starts), out=out.view(B, t_out, H * D), grouped=True)
    return out.transpose(1, 2), den


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
        lse, _unused, _mask = _launch_lse_received(q, k, log_size, ctx.scale, want_received=False)
    grad_q, grad_k, grad_v = launch_fused_qk_backward(
        grad_out, q, k, lse, log_size, ctx.scale, v, dest, den, size, attn_received, ctx.mode,
        slots=None if order is None else (order, starts))
    return grad_q, grad_k, None, None, None, grad_v, None, None, None, None, None, None, None


fusion_attention_op = custom_op("fusion_attention", _fusion_attention_impl)
fused_qk_op = custom_op("fused_attention_output_qk", _fused_qk_impl, _fused_qk_backward, _fused_qk_setup)


def _check_qk(q: torch.Tensor, k: torch.Tensor, log_size: Optional[torch.Tensor], name: str = "log_size") -> None:
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape (B, H, T, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.dtype != k.dtype or q.dtype not in _FLOATS:
        raise ValueError(f"q and k must share a floating dtype, got {q.dtype} and {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k is on {k.device} but q is on {q.device}")
    B, _, T, _ = q.shape
    if log_size is not None and (tuple(log_size.shape) != (B, T) or log_size.device != q.device):
        raise ValueError(f"{name} must have shape (B, T) = ({B}, {T}) on {q.device}")


def fusion_attention(
    q: torch.Tensor, k: torch.Tensor, *, scale: float, log_size: Optional[torch.Tensor] = None,
    size: Optional[torch.Tensor] = None,
) -> FusionAttention:
    """Triton ``fusion_attention``: each query's log-sum-exp and the attention each token
    receives, without forming P. ``received`` and ``lse`` carry no gradient. Given
    ``size`` (not ``log_size``) the kernel takes the log itself and the result's ``mask``
    is the output attention's additive mask, log(size) in q's dtype, a (B, 1, 1, T) view
    of rows padded to 16 elements."""
    if log_size is not None and size is not None:
        raise ValueError("pass the token sizes as size= or their log as log_size=, not both")
    _check_qk(q, k, log_size)
    _check_qk(q, k, size, "size")
    bias = size if size is not None else log_size
    received, lse, mask = fusion_attention_op(
        q.detach(), k.detach(), None if bias is None else bias.detach(), float(scale), size is not None
    )
    T = q.shape[2]
    return FusionAttention(received=received, probs=None, q=q, k=k, lse=lse, log_size=log_size, scale=float(scale),
                           mask=mask[:, None, None, :T] if size is not None else None, size=size)


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
    recomputing P from q, k (the forward does not read ``lse``; the backward does, and computes
    it when None). ``slots`` is the slot
    index ``(order, starts)`` of ``dest`` (``slot_index(dest, t_out)``) when the caller
    already has it. The result is a (B, H, T', D) view of (B, T', H, D) storage, the
    layout the output projection reads."""
    _check_qk(q, k, log_size)
    B, H, T, _ = q.shape
    check_output_args("fused_attention_output_qk", (B, H, T), v, dest, t_out, size, attn_received, mode, q.device)
    if lse is not None and (tuple(lse.shape) != (B, H, T) or lse.dtype != torch.float32 or lse.device != q.device):
        raise ValueError(f"lse must be float32 of shape (B, H, T) = ({B}, {H}, {T}) on {q.device}")
    detach = (lambda t: None if t is None else t.detach())
    order, starts = check_slot_index(slots, B, T, t_out, q.device)
    out, _den = fused_qk_op(q, k, detach(lse), detach(log_size), float(scale), v, dest, t_out,
                            detach(size), detach(attn_received), mode, order, starts)
    return out
