"""Triton launcher of ``fused_attention_output_qk``'s backward (docs/algorithm.md,
"One-step-ahead attention"): dq, dk, dV' of out = rowmerge_w(P @ V'[dest]) with P
recomputed from q, k and the log-sum-exps, flash-style (``_attention_backward_kernel``):
the (B, H, T, T) attention is never formed. Three launches (dq with Delta; dk with the
per-key value gradients; their slot sums), plus the slot index and the log-sum-exps
when the forward was not given them. Deterministic: no atomics.

The gradient is that of the reference (``fused_attention_output_qk_reference``) with the
pooling weights, ``log_size`` and ``lse`` as constants (the reference computes the weights
under no_grad; ``log_size`` comes from sizes, which carry no gradient; ``lse`` is implied
by q and k, whose softmax normaliser the backward differentiates through Delta). ``lse``
must be the one ``fusion_attention`` computed from these q, k, ``log_size`` and ``scale``
(the model layer passes exactly that); another one gives wrong gradients, and checking it
would need a host sync.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import configs
from ._attention_backward_kernel import _attention_bwd_dkv_kernel, _attention_bwd_dq_kernel, _slot_sum_kernel
from ._common import device_guard, last_dim_unit, wrap
from .attention import _pv_precision as _precision  # the forward's dot precision (torch's fp32 setting)
from .slots import launch_slot_index


def launch_fused_qk_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    log_size: Optional[torch.Tensor],
    scale: float,
    v: torch.Tensor,
    dest: torch.Tensor,
    den: torch.Tensor,
    size: Optional[torch.Tensor],
    attn_received: Optional[torch.Tensor],
    mode: int,
    slots: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dV'): gradients of ``fused_attention_output_qk`` wrt q, k (B, H, T, D_QK)
    and v (B, H, T', D), in their dtypes. ``den`` (B, T') is the forward's slot sums of
    the pooling weights; ``slots = (order, starts)`` the slot index of dest (computed
    here when None)."""
    q, k, v, grad_out = (last_dim_unit(t) for t in (q, k, v, grad_out))
    B, H, T, D_QK = q.shape
    t_out, D = v.shape[-2], v.shape[-1]
    device = q.device
    dq = torch.empty(B, H, T, D_QK, device=device, dtype=q.dtype)
    dk = torch.empty(B, H, T, D_QK, device=device, dtype=k.dtype)
    dv = torch.empty(B, H, t_out, D, device=device, dtype=v.dtype)
    if B * H * T == 0:
        return dq, dk, dv.zero_()
    wide = q.dtype == torch.float64 or v.dtype == torch.float64
    acc = torch.float64 if wide else torch.float32
    with device_guard(q):
        order, starts = (s.contiguous() for s in slots) if slots is not None else launch_slot_index(dest, t_out)
        delta = torch.empty(B, H, T, device=device, dtype=acc)
        dvk = torch.empty(B, H, T, D, device=device, dtype=acc)  # per-key value gradients
        has_size = size is not None
        size_arg, ss = (size, size.stride()) if has_size else (den, (0, 0))
        am_arg, sm = (attn_received, attn_received.stride()) if mode == 1 else (den, (0, 0))
        has_log_size = log_size is not None
        logs_arg, sl = (log_size, log_size.stride()) if has_log_size else (den, (0, 0))
        cfg = configs.attention_backward_config(D, D_QK, configs.gpu_configs(device),
                                                q.dtype in (torch.float32, torch.float64))
        common = (q, *q.stride(), k, *k.stride(), lse, *lse.stride(), logs_arg, *sl, float(scale),
                  v, *v.stride(), grad_out, *grad_out.stride(), dest, *dest.stride(), starts, den,
                  size_arg, *ss, am_arg, *sm)
        consts = dict(MODE=mode, HAS_SIZE=has_size, HAS_LOG_SIZE=has_log_size, QK_PRECISION=_precision(q.dtype),
                      PV_PRECISION=_precision(v.dtype), ACC_DTYPE=tl.float64 if wide else tl.float32,
                      BLOCK_D=cfg["BLOCK_D"], BLOCK_DK=cfg["BLOCK_DK"], BLOCK_R=cfg["BLOCK_R"])
        dq_cfg, dkv_cfg = ({k: v for k, v in cfg[n].items() if v is not None} for n in ("dq", "dkv"))
        sum_cfg = cfg["slot_sum"]
        wrap(_attention_bwd_dq_kernel)[(B * H, triton.cdiv(T, dq_cfg["BLOCK_M"]))](
            *common, dq, *dq.stride()[:3], delta, H, T, t_out, D, D_QK, **consts, **dq_cfg)
        wrap(_attention_bwd_dkv_kernel)[(B * H, triton.cdiv(T, dkv_cfg["BLOCK_N"]))](
            *common, delta, dk, *dk.stride()[:3], dvk, H, T, t_out, D, D_QK, **consts, **dkv_cfg)
        if t_out:
            wrap(_slot_sum_kernel)[(B * H, triton.cdiv(t_out, sum_cfg["BLOCK_S"]))](
                dvk, order, starts, dv, *dv.stride()[:3], H, T, t_out, D,
                ACC_DTYPE=consts["ACC_DTYPE"], BLOCK_D=cfg["BLOCK_D"], **sum_cfg)
    return dq, dk, dv
