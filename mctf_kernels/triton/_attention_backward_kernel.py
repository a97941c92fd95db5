"""Triton kernels of the one-step-ahead attention output's backward (docs/algorithm.md,
"One-step-ahead attention"), flash-style: P is recomputed tile by tile from q, k, the
forward's log-sum-exps and log_size, and never written to memory.

The op is out[o] = sum_{q in S(o)} f_q (P @ V'[dest])[q] with P = softmax(s),
s = (q * scale) k^T + log_size, and f_q = w_q / W_o the query's share of its slot (the
pooling weights are constants, as in the reference). With G[q] = f_q grad[dest q] (the
row merge's adjoint; 0 for a query in no slot):

- dP[q, k] = G[q] . V'[dest k]   (0 for a key in no slot)
- Delta[q] = sum_k P dP = G[q] . (P @ V'[dest])[q]
- dS = P * (dP - Delta);  dq = scale * dS @ K;  dk = dS^T @ (q * scale)
- dV'[o] = sum_{k in S(o)} (P^T @ G)[k]

Three launches, no atomics (every output element is written by one program, summed in
a fixed order: bit-identical run to run):

- ``_attention_bwd_dq_kernel`` (query blocks): Delta (one pass over the keys) and dq
  (a second pass);
- ``_attention_bwd_dkv_kernel`` (key blocks): dk and the per-key value gradient
  P^T @ G, over every query block;
- ``_slot_sum_kernel`` (slot blocks): dV' = the per-key value gradients summed over
  each slot's members (the slot index ``order`` / ``starts``), in ascending token order.
"""
import triton
import triton.language as tl

from ._flash_attention_kernel import key_bias, keys_t, logits_tile, scaled_queries
from ._merge_kernel import _row_size_max, _size_and_weight

@triton.jit
def _query_grad(offs_m, mask_m, b, h, smax,
                g_ptr, stride_gb, stride_gh, stride_gt, stride_gd, offs_d, mask_d,
                dest_ptr, stride_db, stride_dt, starts_ptr, den_ptr,
                size_ptr, stride_sb, stride_st, attn_m_ptr, stride_mb, stride_mt,
                T, T_out,
                MODE: tl.constexpr, HAS_SIZE: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """G (BLOCK_M, BLOCK_D) in ACC_DTYPE: each query's share f_q of its slot's gradient.
    f_q = w_q / W (the forward's weight sum ``den``); a slot whose weights sum to 0 has
    w = 1 and W = its member count. Indices clamped: nothing is read out of bounds."""
    d = tl.load(dest_ptr + b * stride_db + offs_m * stride_dt, mask=mask_m, other=-1)
    valid = mask_m & (d >= 0) & (d < T_out)
    d = tl.where(valid, d, 0).to(tl.int32)
    starts_row = starts_ptr + b * (T_out + 1)
    start = tl.minimum(tl.maximum(tl.load(starts_row + d, mask=valid, other=0), 0), T)
    count = tl.minimum(tl.maximum(tl.load(starts_row + d + 1, mask=valid, other=0), start), T) - start
    _s, w = _size_and_weight(size_ptr + b * stride_sb, stride_st, attn_m_ptr + b * stride_mb, stride_mt,
                             offs_m, valid, smax, MODE, HAS_SIZE)
    den = tl.load(den_ptr + b * T_out + d, mask=valid, other=1.0)
    unweighted = den == 0
    w = tl.where(unweighted, 1.0, w).to(ACC_DTYPE)
    den = tl.where(unweighted, tl.maximum(count, 1).to(tl.float32), den).to(ACC_DTYPE)
    f = tl.where(valid, w / den, 0.0)
    g = tl.load(g_ptr + b * stride_gb + h * stride_gh + d[:, None] * stride_gt + offs_d[None, :] * stride_gd,
                mask=valid[:, None] & mask_d[None, :], other=0.0).to(ACC_DTYPE)
    return g * f[:, None]


@triton.jit
def _slot_values(v_row, stride_vt, stride_vd, d_row, stride_dt, offs_k, mask_k, offs_d, mask_d, T_out):
    """V'[dest k] (BLOCK_N, BLOCK_D) for keys offs_k; 0 for keys in no slot (nothing read)."""
    kd = tl.load(d_row + offs_k * stride_dt, mask=mask_k, other=-1)
    mask_v = mask_k & (kd >= 0) & (kd < T_out)
    kd = tl.where(mask_v, kd, 0).to(tl.int32)  # int32 row indices: half the registers of int64 (T' < 2**31)
    return tl.load(v_row + kd[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                   mask=mask_v[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _attention_bwd_dq_kernel(
    q_ptr, stride_qb, stride_qh, stride_qt, stride_qd,
    k_ptr, stride_kb, stride_kh, stride_kt, stride_kd,
    lse_ptr, stride_eb, stride_eh, stride_et,  # (B, H, T) float32: the forward's log-sum-exps
    logs_ptr, stride_lb, stride_lt,  # log_size (B, T): HAS_LOG_SIZE only
    scale,
    v_ptr, stride_vb, stride_vh, stride_vt, stride_vd,  # V' (B, H, T', D)
    g_ptr, stride_gb, stride_gh, stride_gt, stride_gd,  # grad of the output (B, H, T', D)
    dest_ptr, stride_db, stride_dt,
    starts_ptr,  # (B, T'+1) contiguous: slot bounds (member counts)
    den_ptr,  # (B, T') float32 (float64 for float64 values) contiguous: the forward's slot sums of the weights
    size_ptr, stride_sb, stride_st,
    attn_m_ptr, stride_mb, stride_mt,
    dq_ptr, stride_yb, stride_yh, stride_yt,  # (B, H, T, D_QK), channel stride 1
    delta_ptr,  # (B, H, T) ACC_DTYPE contiguous
    H, T, T_out, D, D_QK,
    MODE: tl.constexpr, HAS_SIZE: tl.constexpr, HAS_LOG_SIZE: tl.constexpr,
    QK_PRECISION: tl.constexpr, PV_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_R: tl.constexpr,  # sizes per step of the size-max scan
):
    bh = tl.program_id(0).to(tl.int64)
    mb = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < T
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_dk = tl.arange(0, BLOCK_DK)
    mask_dk = offs_dk < D_QK
    v_dtype = v_ptr.dtype.element_ty
    k_dtype = k_ptr.dtype.element_ty
    smax = _row_size_max(size_ptr + b * stride_sb, stride_st, T, MODE, HAS_SIZE, BLOCK_R)
    g = _query_grad(offs_m, mask_m, b, h, smax, g_ptr, stride_gb, stride_gh, stride_gt, stride_gd, offs_d, mask_d,
                    dest_ptr, stride_db, stride_dt, starts_ptr, den_ptr,
                    size_ptr, stride_sb, stride_st, attn_m_ptr, stride_mb, stride_mt, T, T_out, MODE, HAS_SIZE,
                    ACC_DTYPE)
    gv = g.to(v_dtype)
    qs = scaled_queries(q_ptr + b * stride_qb + h * stride_qh, offs_m, mask_m, stride_qt, stride_qd,
                        offs_dk, mask_dk, scale)
    lse = tl.load(lse_ptr + b * stride_eb + h * stride_eh + offs_m * stride_et, mask=mask_m, other=0.0)
    k_row = k_ptr + b * stride_kb + h * stride_kh
    v_row = v_ptr + b * stride_vb + h * stride_vh
    d_row = dest_ptr + b * stride_db
    logs_row = logs_ptr + b * stride_lb

    # Pass 1: Delta = G . (P @ V'[dest]) row by row.
    y = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    for k0 in range(0, T, BLOCK_N):
        offs_k = k0 + tl.arange(0, BLOCK_N)
        mask_k = offs_k < T
        kt = keys_t(k_row, offs_k, mask_k, stride_kt, stride_kd, offs_dk, mask_dk)
        p = tl.exp(logits_tile(qs, kt, key_bias(logs_row, offs_k, mask_k, stride_lt, HAS_LOG_SIZE),
                               QK_PRECISION) - lse[:, None])
        vt = _slot_values(v_row, stride_vt, stride_vd, d_row, stride_dt, offs_k, mask_k, offs_d, mask_d, T_out)
        y = tl.dot(p.to(v_dtype), vt, y, input_precision=PV_PRECISION)
    delta = tl.sum(y * g, axis=1)

    # Pass 2: dS = P (dP - Delta), dq = scale * dS @ K.
    dq = tl.zeros([BLOCK_M, BLOCK_DK], ACC_DTYPE)
    for k0 in range(0, T, BLOCK_N):
        offs_k = k0 + tl.arange(0, BLOCK_N)
        mask_k = offs_k < T
        kt = keys_t(k_row, offs_k, mask_k, stride_kt, stride_kd, offs_dk, mask_dk)
        p = tl.exp(logits_tile(qs, kt, key_bias(logs_row, offs_k, mask_k, stride_lt, HAS_LOG_SIZE),
                               QK_PRECISION) - lse[:, None])
        vt = _slot_values(v_row, stride_vt, stride_vd, d_row, stride_dt, offs_k, mask_k, offs_d, mask_d, T_out)
        dp = tl.dot(gv, tl.trans(vt), input_precision=PV_PRECISION, out_dtype=ACC_DTYPE)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_dtype), tl.trans(kt), dq, input_precision=QK_PRECISION)
    dq = dq * scale
    tl.store(dq_ptr + b * stride_yb + h * stride_yh + offs_m[:, None] * stride_yt + offs_dk[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_dk[None, :])
    tl.store(delta_ptr + bh * T + offs_m, delta, mask=mask_m)


@triton.jit
def _attention_bwd_dkv_kernel(
    q_ptr, stride_qb, stride_qh, stride_qt, stride_qd,
    k_ptr, stride_kb, stride_kh, stride_kt, stride_kd,
    lse_ptr, stride_eb, stride_eh, stride_et,
    logs_ptr, stride_lb, stride_lt,
    scale,
    v_ptr, stride_vb, stride_vh, stride_vt, stride_vd,
    g_ptr, stride_gb, stride_gh, stride_gt, stride_gd,
    dest_ptr, stride_db, stride_dt,
    starts_ptr, den_ptr,
    size_ptr, stride_sb, stride_st,
    attn_m_ptr, stride_mb, stride_mt,
    delta_ptr,  # (B, H, T) ACC_DTYPE contiguous, from _attention_bwd_dq_kernel
    dk_ptr, stride_zb, stride_zh, stride_zt,  # (B, H, T, D_QK), channel stride 1
    dvk_ptr,  # (B, H, T, D) ACC_DTYPE contiguous: per-key value gradient P^T @ G
    H, T, T_out, D, D_QK,
    MODE: tl.constexpr, HAS_SIZE: tl.constexpr, HAS_LOG_SIZE: tl.constexpr,
    QK_PRECISION: tl.constexpr, PV_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per step
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    nb = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < T
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_dk = tl.arange(0, BLOCK_DK)
    mask_dk = offs_dk < D_QK
    v_dtype = v_ptr.dtype.element_ty
    q_dtype = q_ptr.dtype.element_ty
    smax = _row_size_max(size_ptr + b * stride_sb, stride_st, T, MODE, HAS_SIZE, BLOCK_R)
    kt = keys_t(k_ptr + b * stride_kb + h * stride_kh, offs_n, mask_n, stride_kt, stride_kd, offs_dk, mask_dk)
    bias = key_bias(logs_ptr + b * stride_lb, offs_n, mask_n, stride_lt, HAS_LOG_SIZE)
    vt = _slot_values(v_ptr + b * stride_vb + h * stride_vh, stride_vt, stride_vd, dest_ptr + b * stride_db,
                      stride_dt, offs_n, mask_n, offs_d, mask_d, T_out)
    q_row = q_ptr + b * stride_qb + h * stride_qh
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    dk = tl.zeros([BLOCK_N, BLOCK_DK], ACC_DTYPE)
    for m0 in range(0, T, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < T
        qs = scaled_queries(q_row, offs_m, mask_m, stride_qt, stride_qd, offs_dk, mask_dk, scale)
        lse = tl.load(lse_ptr + b * stride_eb + h * stride_eh + offs_m * stride_et, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptr + bh * T + offs_m, mask=mask_m, other=0.0)
        g = _query_grad(offs_m, mask_m, b, h, smax, g_ptr, stride_gb, stride_gh, stride_gt, stride_gd, offs_d,
                        mask_d, dest_ptr, stride_db, stride_dt, starts_ptr, den_ptr,
                        size_ptr, stride_sb, stride_st, attn_m_ptr, stride_mb, stride_mt, T, T_out, MODE, HAS_SIZE,
                        ACC_DTYPE)
        gv = g.to(v_dtype)
        # padding query rows (past T) hold finite logits: zeroed
        p = tl.where(mask_m[:, None], tl.exp(logits_tile(qs, kt, bias, QK_PRECISION) - lse[:, None]), 0.0)
        dv = tl.dot(tl.trans(p.to(v_dtype)), gv, dv, input_precision=PV_PRECISION)
        dp = tl.dot(gv, tl.trans(vt), input_precision=PV_PRECISION, out_dtype=ACC_DTYPE)
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q_dtype)), qs, dk, input_precision=QK_PRECISION)
    tl.store(dk_ptr + b * stride_zb + h * stride_zh + offs_n[:, None] * stride_zt + offs_dk[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_dk[None, :])
    tl.store(dvk_ptr + (bh * T + offs_n[:, None]) * D + offs_d[None, :], dv, mask=mask_n[:, None] & mask_d[None, :])


@triton.jit
def _slot_sum_kernel(
    dvk_ptr,  # (B, H, T, D) contiguous
    order_ptr, starts_ptr,  # slot index: contiguous (B, T) and (B, T'+1)
    dv_ptr, stride_ob, stride_oh, stride_ot,  # (B, H, T', D), channel stride 1
    H, T, T_out, D,
    ACC_DTYPE: tl.constexpr,
    BLOCK_S: tl.constexpr,  # slots per program
    BLOCK_D: tl.constexpr,
):
    """dV'[o] = sum of the per-key gradients of slot o's members, ascending token order;
    0 for a slot with no member. Slot bounds and members clamped as in the forward."""
    bh = tl.program_id(0).to(tl.int64)
    sb = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < T_out
    bounds = starts_ptr + b * (T_out + 1) + offs_s
    start = tl.minimum(tl.maximum(tl.load(bounds, mask=mask_s, other=0), 0), T)
    count = tl.minimum(tl.maximum(tl.load(bounds + 1, mask=mask_s, other=0), start), T) - start
    members = order_ptr + b * T + start
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_S, BLOCK_D], ACC_DTYPE)
    for k in range(0, tl.max(count, axis=0)):
        live = k < count
        t = tl.minimum(tl.maximum(tl.load(members + k, mask=live, other=0), 0), T - 1)
        acc += tl.load(dvk_ptr + (bh * T + t[:, None]) * D + offs_d[None, :], mask=live[:, None] & mask_d[None, :],
                       other=0.0).to(ACC_DTYPE)
    tl.store(dv_ptr + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_ot + offs_d[None, :],
             acc.to(dv_ptr.dtype.element_ty), mask=mask_s[:, None] & mask_d[None, :])
