"""Triton launchers of ``attention_received`` and ``fused_attention_output``; their
eager references are in ``mctf_kernels.attention``.

Both ops are ``mctf::`` custom ops (``torch.library.triton_op``) with an eager
backward, so a fine-tuned model can train through them and torch.compile sees
the kernels.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._checks import check_output_operands, check_slot_index
from ..attention import attention_received_reference, fused_attention_output_reference  # noqa: F401
from ..merge import pooling_weights
from . import configs
from ._attention_kernel import _attention_received_kernel, _fused_attention_output_kernel
from ._common import block_size, custom_op, device_guard, interpreting, last_dim_unit, wrap
from .slots import launch_slot_index


# ---------------------------------------------------------------- attention_received

def _attention_received_impl(attn: torch.Tensor) -> torch.Tensor:
    attn = last_dim_unit(attn)
    B, H, T, _ = attn.shape
    part = torch.empty(B, H, T, device=attn.device, dtype=torch.float32)
    BLOCK_K = block_size(T, 64)
    BLOCK_Q = 128 if interpreting() else 32
    grid = (B * H, triton.cdiv(T, BLOCK_K))
    with device_guard(attn):
        wrap(_attention_received_kernel)[grid](
            attn, *attn.stride(), part, H, T, BLOCK_Q=BLOCK_Q, BLOCK_K=BLOCK_K, num_warps=4,
        )
    # Heads are summed here in a fixed order (deterministic, no atomics); the
    # partials are T times smaller than attn.
    return part.sum(dim=1) / (H * T)


def _attention_received_setup(ctx, inputs, output) -> None:
    (attn,) = inputs
    ctx.attn_shape, ctx.attn_dtype = attn.shape, attn.dtype


def _attention_received_backward(ctx, grad):
    B, H, T, _ = ctx.attn_shape
    g = (grad / (H * T)).to(ctx.attn_dtype)
    return g[:, None, None, :].expand(B, H, T, T)


# ---------------------------------------------------------------- fused_attention_output

def _pv_precision(dtype: torch.dtype) -> str:
    # Follow torch's float32 matmul setting so the kernel matches the reference's P @ V.
    if dtype == torch.float32 and not interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def launch_fused_output(
    v: torch.Tensor,
    dest: torch.Tensor,
    t_out: int,
    size: Optional[torch.Tensor],
    attn_received: Optional[torch.Tensor],
    mode: int,
    *,
    attn: torch.Tensor,
    slots: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One launch of ``_fused_attention_output_kernel``: P' @ V' (B, H, T', D) and the
    slot sums of the pooling weights den (B, T'), P read from ``attn`` (B, H, T, T).
    ``slots = (order, starts)`` is ``slot_index(dest, t_out)``, computed here when None.
    The output is a (B, H, T', D) view of (B, T', H, D) storage: the layout ``proj`` reads."""
    v = last_dim_unit(v)
    B, H, _, D = v.shape
    T = dest.shape[1]
    device = v.device
    with device_guard(v):
        order, starts = launch_slot_index(dest, t_out) if slots is None else slots
        order, starts = order.contiguous(), starts.contiguous()
        out = torch.empty(B, t_out, H, D, device=device, dtype=v.dtype).transpose(1, 2)
        den = torch.empty(B, t_out, device=device, dtype=torch.float32)

        has_size = size is not None
        size_arg, ss = (size, size.stride()) if has_size else (den, (0, 0))
        am_arg, sm = (attn_received, attn_received.stride()) if mode == 1 else (den, (0, 0))
        attn = last_dim_unit(attn)

        cfg = configs.attention_output_config(D, configs.gpu_configs(device),
                                              v.dtype in (torch.float32, torch.float64))
        grid = (B * H, triton.cdiv(T, cfg["BLOCK_M"]))
        wrap(_fused_attention_output_kernel)[grid](
            attn, *attn.stride(),
            v, *v.stride(),
            dest, *dest.stride(),
            order, starts,
            size_arg, ss[0], ss[1],
            am_arg, sm[0], sm[1],
            out, *out.stride()[:3],
            den,
            H, T, t_out, D,
            MODE=mode, HAS_SIZE=has_size, PV_PRECISION=_pv_precision(v.dtype),
            ACC_DTYPE=tl.float64 if v.dtype == torch.float64 else tl.float32,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
            BLOCK_T=cfg["BLOCK_T"], num_warps=cfg["num_warps"],
            **({} if cfg["maxnreg"] is None else dict(maxnreg=cfg["maxnreg"])),
        )
    return out, den


def _fused_impl(
    attn: torch.Tensor,
    v: torch.Tensor,
    dest: torch.Tensor,
    t_out: int,
    size: Optional[torch.Tensor],
    attn_received: Optional[torch.Tensor],
    mode: int,
    order: Optional[torch.Tensor],
    starts: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    slots = None if order is None else (order, starts)
    return launch_fused_output(v, dest, t_out, size, attn_received, mode, attn=attn, slots=slots)


def fused_attention_output_backward(
    grad_out: torch.Tensor,
    attn: torch.Tensor,
    v: torch.Tensor,
    dest: torch.Tensor,
    den: torch.Tensor,
    size: Optional[torch.Tensor],
    attn_received: Optional[torch.Tensor],
    mode: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eager backward of out = rowmerge_w(P @ V'[dest]), in float32.

    With G_q = grad[dest q] * w_q / W[dest q] (the row merge's adjoint):
    dP = G @ V'^T gathered on the key axis by dest; dV' = M @ (P^T @ G) with the
    one-hot slot matrix M (T', T): a matmul instead of a float scatter_add, so the
    backward is deterministic too. A slot whose weights sum to 0 (``den`` == 0, the
    kernel's sums) has w_q = 1 and W = its member count, as in the forward. Queries and
    keys whose slot is outside [0, T') are in no slot: they get and give no gradient.
    """
    B, H, T, _ = attn.shape
    t_out, D = v.shape[-2], v.shape[-1]
    dest = dest.long()
    in_slot = (dest >= 0) & (dest < t_out)
    index = torch.where(in_slot, dest, 0)  # gathers stay inside their tensors; masked below
    if size is None:
        size = torch.ones(B, T, device=dest.device, dtype=torch.float32)
    w = pooling_weights(mode, size, attn_received)
    unweighted = den == 0
    count = torch.zeros_like(den).scatter_add(1, index, in_slot.float())
    w = torch.where(unweighted.gather(1, index), 1.0, w)
    w = torch.where(in_slot, w, 0.0)
    g = grad_out.float() / torch.where(unweighted, count, den)[:, None, :, None]
    g = g.gather(2, index[:, None, :, None].expand(B, H, T, D)) * w[:, None, :, None]
    p = attn.to(v.dtype).float()
    grad_attn = (g @ v.float().transpose(-1, -2)).gather(3, index[:, None, None, :].expand(B, H, T, T))
    grad_attn = torch.where(in_slot[:, None, None, :], grad_attn, 0.0)
    onehot = (dest[:, None, :] == torch.arange(t_out, device=dest.device)[None, :, None]).float()
    grad_v = onehot[:, None] @ (p.transpose(-1, -2) @ g)
    return grad_attn.to(attn.dtype), grad_v.to(v.dtype)


def _fused_setup(ctx, inputs, output) -> None:
    attn, v, dest, _t_out, size, attn_received, mode, _order, _starts = inputs
    _out, den = output
    ctx.mode = mode
    ctx.save_for_backward(attn, v, dest, den, size, attn_received)


def _fused_backward(ctx, grad_out, _grad_den):
    attn, v, dest, den, size, attn_received = ctx.saved_tensors
    grad_attn, grad_v = fused_attention_output_backward(grad_out, attn, v, dest, den, size, attn_received, ctx.mode)
    return grad_attn, grad_v, None, None, None, None, None, None, None


attention_received_op = custom_op("attention_received", _attention_received_impl,
                                  _attention_received_backward, _attention_received_setup)
fused_op = custom_op("fused_attention_output", _fused_impl, _fused_backward, _fused_setup)


def check_output_args(op: str, bht, v, dest, t_out, size, attn_received, mode, device) -> None:
    """What the two P' @ V' launchers (from P, or from q and k) check again after ``ops``:
    the operands' shapes and devices (the kernels index by them; one shared check, see
    ``check_output_operands``) and the pooling mode, where a direct call with mode 2 or
    mode 1 without ``attn_received`` would otherwise give a wrong result, not an error."""
    check_output_operands(*bht, v, dest, t_out, size, attn_received, device)
    if mode == 2:
        raise ValueError(f"{op} has no kernel for max pooling (mode 2): P' does not factor")
    if mode not in (0, 1, 3):
        raise ValueError(f"pooling mode must be one of (0, 1, 3) here, got {mode!r}")
    if mode == 1 and attn_received is None:
        raise ValueError("mode 1 (attention-and-size pooling) needs attn_received")


def attention_received(attn: torch.Tensor) -> torch.Tensor:
    """Triton ``attention_received``: (B, H, T, T) -> (B, T) float32."""
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must have shape (B, H, T, T), got {tuple(attn.shape)}")
    return attention_received_op(attn)


def fused_attention_output(
    attn: torch.Tensor,
    v: torch.Tensor,
    dest: torch.Tensor,
    t_out: int,
    size: Optional[torch.Tensor] = None,
    attn_received: Optional[torch.Tensor] = None,
    *,
    mode: int = 1,
    slots: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Triton ``fused_attention_output``: P' @ V' (B, H, T', D) for pooling modes 0, 1, 3
    (a view of (B, T', H, D) storage). ``slots``: ``slot_index(dest, t_out)`` if already known."""
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must have shape (B, H, T, T), got {tuple(attn.shape)}")
    check_output_args("fused_attention_output", attn.shape[:3], v, dest, t_out, size, attn_received, mode,
                      attn.device)
    order, starts = check_slot_index(slots, attn.shape[0], attn.shape[2], t_out, attn.device)
    out, _den = fused_op(attn, v, dest, t_out, size, attn_received, mode, order, starts)
    return out
