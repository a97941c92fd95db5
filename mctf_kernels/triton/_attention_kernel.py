"""Triton kernels of the attention-side ops (SPEC sections 3 and 6).

- ``_attention_received_kernel``: column sums of P (B, H, T, T) per head; the
  launcher sums the H partials in a fixed order (no atomics, deterministic).
- ``_fused_attention_output_kernel``: P' @ V' = rowmerge(P @ V'[dest]) in one
  pass over P, never forming P' nor gathering V'[dest] into memory. With
  ``FROM_QK`` it reads no P at all: each tile is recomputed as exp(s - lse) from
  q and k (the flash-style ``fused_attention_output_qk``).
"""
import triton
import triton.language as tl

from ._flash_attention_kernel import key_bias, keys_t, logits_tile, scaled_queries


@triton.jit
def _attention_received_kernel(
    attn_ptr, stride_ab, stride_ah, stride_aq, stride_ak,
    part_ptr,  # (B, H, T) float32, contiguous: per-head column sums
    H, T,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < T
    base = attn_ptr + b * stride_ab + h * stride_ah + offs_k[None, :] * stride_ak
    acc = tl.zeros([BLOCK_Q, BLOCK_K], tl.float32)
    # Keep a (BLOCK_Q, BLOCK_K) accumulator and reduce the query axis once at the
    # end: fewer cross-thread reductions than one tl.sum per tile.
    for q0 in range(0, T, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        mask = (offs_q[:, None] < T) & mask_k[None, :]
        acc += tl.load(base + offs_q[:, None] * stride_aq, mask=mask, other=0.0).to(tl.float32)
    tl.store(part_ptr + bh * T + offs_k, tl.sum(acc, axis=0), mask=mask_k)


@triton.jit
def _fused_attention_output_kernel(
    attn_ptr, stride_ab, stride_ah, stride_aq, stride_ak,  # P (B, H, T, T); not read when FROM_QK
    q_ptr, stride_qb, stride_qh, stride_qt, stride_qd,  # q, k (B, H, T, D_QK): FROM_QK only
    k_ptr, stride_kb, stride_kh, stride_kt, stride_kd,
    lse_ptr, stride_eb, stride_eh, stride_et,  # (B, H, T) float32 per-query log-sum-exp: FROM_QK only
    logs_ptr, stride_lb, stride_lt,  # log_size (B, T): FROM_QK with HAS_LOG_SIZE only
    scale,
    v_ptr, stride_vb, stride_vh, stride_vt, stride_vd,
    dest_ptr, stride_db, stride_dt,
    order_ptr, starts_ptr,  # slot index of dest: contiguous (B, T) and (B, T'+1) int64
    size_ptr, stride_sb, stride_st,
    attn_m_ptr, stride_mb, stride_mt,
    smax_ptr,  # (B,) float32, mode 1 with sizes only
    out_ptr, stride_ob, stride_oh, stride_ot,  # out's channel stride is 1
    den_ptr,  # (B, T') float32: slot sums of the pooling weights
    H, T, T_out, D, D_QK,
    MODE: tl.constexpr,  # 0 size, 1 attention*size, 3 mean (max does not factor)
    HAS_SIZE: tl.constexpr,
    FROM_QK: tl.constexpr,  # recompute P tiles from q, k, lse instead of loading P
    HAS_LOG_SIZE: tl.constexpr,
    QK_PRECISION: tl.constexpr,  # as PV_PRECISION, for q @ k^T (FROM_QK)
    PV_PRECISION: tl.constexpr,  # "ieee" or "tf32" for float32 P @ V (as torch's matmul setting)
    ACC_DTYPE: tl.constexpr,  # float32, or float64 for float64 V (gradcheck)
    BLOCK_S: tl.constexpr,  # output slots per program
    BLOCK_M: tl.constexpr,  # member queries per step
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr,
    BLOCK_DK: tl.constexpr,  # q, k head dim block (FROM_QK)
):
    # One program owns BLOCK_S consecutive slots of one (b, h). Their member
    # queries are a contiguous run of the slot index, walked BLOCK_M at a time:
    #   O_m  = P[q_m, :] @ V'[dest[:]]                 (K loop, V' rows gathered by dest)
    #   acc += A @ O_m, A[s, m] = w_m * [dest[q_m] == s] (the weighted row merge as a dot)
    bh = tl.program_id(0).to(tl.int64)
    sb = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    s0 = sb * BLOCK_S
    offs_s = s0 + tl.arange(0, BLOCK_S)
    s_end = tl.minimum(s0 + BLOCK_S, T_out)
    m_lo = tl.load(starts_ptr + b * (T_out + 1) + s0)
    m_hi = tl.load(starts_ptr + b * (T_out + 1) + s_end)

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    p_row = attn_ptr + b * stride_ab + h * stride_ah
    v_row = v_ptr + b * stride_vb + h * stride_vh
    d_row = dest_ptr + b * stride_db
    offs_dk = tl.arange(0, BLOCK_DK)
    mask_dk = offs_dk < D_QK
    q_row = q_ptr + b * stride_qb + h * stride_qh
    k_row = k_ptr + b * stride_kb + h * stride_kh
    logs_row = logs_ptr + b * stride_lb

    acc = tl.zeros([BLOCK_S, BLOCK_D], ACC_DTYPE)
    den = tl.zeros([BLOCK_S], ACC_DTYPE)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        pos = m0 + tl.arange(0, BLOCK_M)
        mask_m = pos < m_hi
        q = tl.load(order_ptr + b * T + pos, mask=mask_m, other=0)
        slot_q = tl.load(d_row + q * stride_dt, mask=mask_m, other=-1).to(tl.int64)

        if HAS_SIZE:
            s = tl.load(size_ptr + b * stride_sb + q * stride_st, mask=mask_m, other=0.0).to(tl.float32)
        else:
            s = tl.full([BLOCK_M], 1.0, tl.float32)
        if MODE == 0:
            w = s
        elif MODE == 1:
            a = tl.load(attn_m_ptr + b * stride_mb + q * stride_mt, mask=mask_m, other=0.0).to(tl.float32)
            if HAS_SIZE:
                w = a * (s / tl.load(smax_ptr + b))  # as pooling_weights: a * (s / max s)
            else:
                w = a
        else:
            w = tl.full([BLOCK_M], 1.0, tl.float32)
        w = tl.where(mask_m, w, 0.0).to(ACC_DTYPE)

        if FROM_QK:  # this step's queries, scaled, and their log-sum-exps
            qs = scaled_queries(q_row, q, mask_m, stride_qt, stride_qd, offs_dk, mask_dk, scale)
            lse = tl.load(lse_ptr + b * stride_eb + h * stride_eh + q * stride_et, mask=mask_m, other=0.0)

        o = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
        for k0 in range(0, T, BLOCK_N):
            offs_k = k0 + tl.arange(0, BLOCK_N)
            mask_k = offs_k < T
            if FROM_QK:  # P tile = exp(s - lse); keys past T have s = -inf
                kt = keys_t(k_row, offs_k, mask_k, stride_kt, stride_kd, offs_dk, mask_dk)
                logits = logits_tile(qs, kt, key_bias(logs_row, offs_k, mask_k, stride_lt, HAS_LOG_SIZE),
                                     QK_PRECISION)
                p = tl.where(mask_m[:, None], tl.exp(logits - lse.to(tl.float32)[:, None]), 0.0)
            else:
                p = tl.load(p_row + q[:, None] * stride_aq + offs_k[None, :] * stride_ak,
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            kd = tl.load(d_row + offs_k * stride_dt, mask=mask_k, other=0).to(tl.int64)
            vt = tl.load(v_row + kd[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                         mask=mask_k[:, None] & mask_d[None, :], other=0.0)
            # The reference multiplies attn.to(v.dtype) @ v; same operand rounding here.
            o = tl.dot(p.to(vt.dtype), vt, o, input_precision=PV_PRECISION)

        sel = tl.where(slot_q[None, :] == offs_s[:, None], w[None, :], 0.0)
        acc = tl.dot(sel, o, acc, input_precision="ieee")  # fp32 weights stay exact
        den += tl.sum(sel, axis=1)

    mask_s = offs_s < T_out
    # An empty slot gives 0/0 = NaN, like the reference; rows past T' divide by 1.
    out = acc / tl.where(mask_s, den, 1.0)[:, None]
    dst = out_ptr + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_ot + offs_d[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mask_s[:, None] & mask_d[None, :])
    tl.store(den_ptr + b * T_out + offs_s, den.to(tl.float32), mask=mask_s & (h == 0))
