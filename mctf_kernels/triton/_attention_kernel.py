"""Triton kernels of the attention-side ops (docs/algorithm.md, "One-step-ahead attention").

- ``_attention_received_kernel``: column sums of P (B, H, T, T) per head; the
  launcher sums the H partials in a fixed order (no atomics, deterministic).
- ``_fused_attention_output_kernel``: P' @ V' = rowmerge(P @ V'[dest]) in one pass,
  flash-style over the queries taken in slot order (the slot index ``order``), so a
  64-row query tile is full and a slot's members are consecutive rows; its epilogue
  pools those rows into their slots. P' is never formed, V'[dest] never gathered into
  memory. With ``FROM_QK`` no P is read: each tile is exp(s - lse) from q and k.
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
def _slot_rows(pos, m_end, order_row, d_row, stride_dt, starts_row, T, T_out):
    """For query positions ``pos`` in slot order: the token, its slot, whether it counts
    (inside [.., m_end) with a slot in [0, T')), and whether it is its slot's first member.
    Every index is clamped: no ``order`` / ``dest`` / ``starts`` value reads out of bounds."""
    in_rows = pos < m_end
    tok = tl.load(order_row + pos, mask=in_rows, other=0)
    tok = tl.minimum(tl.maximum(tok, 0), T - 1)
    slot = tl.load(d_row + tok * stride_dt, mask=in_rows, other=-1).to(tl.int64)
    valid = in_rows & (slot >= 0) & (slot < T_out)
    slot = tl.where(valid, slot, 0)
    first = tl.load(starts_row + slot, mask=valid, other=-1)
    return tok, slot, valid, valid & (first == pos)


@triton.jit
def _pool_weights(tok, valid, b, size_ptr, stride_sb, stride_st, attn_m_ptr, stride_mb, stride_mt, smax,
                  MODE: tl.constexpr, HAS_SIZE: tl.constexpr):
    """The pooling weight of each token (mode 0 size, 1 attention * size / max size, 3 one)."""
    if HAS_SIZE:
        s = tl.load(size_ptr + b * stride_sb + tok * stride_st, mask=valid, other=0.0).to(tl.float32)
    else:
        s = tl.full(tok.shape, 1.0, tl.float32)
    if MODE == 0:
        w = s
    elif MODE == 1:
        a = tl.load(attn_m_ptr + b * stride_mb + tok * stride_mt, mask=valid, other=0.0).to(tl.float32)
        if HAS_SIZE:
            w = a * (s / smax)  # as pooling_weights: a * (s / max s)
        else:
            w = a
    else:
        w = tl.full(tok.shape, 1.0, tl.float32)
    return tl.where(valid, w, 0.0)


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
    BLOCK_M: tl.constexpr,  # query rows per tile, in slot order
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr,
    BLOCK_DK: tl.constexpr,  # q, k head dim block (FROM_QK)
    BLOCK_T: tl.constexpr,  # tokens per step of the max-size scan (mode 1 with sizes)
):
    # Program (b, h, tile) takes the query rows at positions [row0, row0 + BLOCK_M) of
    # the slot order and owns the slots whose first member lies there (at most BLOCK_M).
    # Its last slot may run past the tile: those members are one more (rare) step.
    # Each owned slot j gets   out_j = sum_m sel[j, m] * (w_m / den_j) * P[q_m, :] @ V'[dest]
    # with sel the 0/1 map of rows to owned slots: weights are folded into P before P
    # is rounded to V's dtype (w / den <= 1, so no underflow), and the row merge is a
    # 0/1 dot that is exact in any dtype.
    bh = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    row0 = tb * BLOCK_M
    tile_end = tl.minimum(row0 + BLOCK_M, T)
    order_row = order_ptr + b * T
    starts_row = starts_ptr + b * (T_out + 1)
    d_row = dest_ptr + b * stride_db
    out_dtype = out_ptr.dtype.element_ty
    v_dtype = v_ptr.dtype.element_ty

    smax = 1.0
    if MODE == 1:
        if HAS_SIZE:  # max size of the row (each program rescans it: T loads, no extra launch)
            mx = tl.full([BLOCK_T], float("-inf"), tl.float32)
            for t0 in range(0, T, BLOCK_T):
                offs_t = t0 + tl.arange(0, BLOCK_T)
                sz = tl.load(size_ptr + b * stride_sb + offs_t * stride_st, mask=offs_t < T, other=float("-inf"))
                mx = tl.maximum(mx, sz.to(tl.float32))
            smax = tl.max(mx, axis=0)

    # The member range: past the tile only when the tile's last row starts or continues
    # a slot owned here.
    _t, slot_last, valid_last, _f = _slot_rows(tile_end - 1 + tl.zeros([1], tl.int64), T, order_row, d_row,
                                               stride_dt, starts_row, T, T_out)
    last_start = tl.load(starts_row + slot_last, mask=valid_last, other=-1)
    last_end = tl.load(starts_row + slot_last + 1, mask=valid_last, other=0)
    last_end = tl.minimum(tl.maximum(last_end, tile_end), T)
    m_end = tl.max(tl.where(valid_last & (last_start >= row0), last_end, tile_end), axis=0)

    offs_j = tl.arange(0, BLOCK_M)  # owned slot, local index
    offs_r = tl.arange(0, BLOCK_M)  # row in a step

    # Pass 1 (indices and weights only): each owned slot's id and weight sum.
    den = tl.zeros([BLOCK_M], ACC_DTYPE)
    slot_of = tl.full([BLOCK_M], -1, tl.int64)
    carry = 0
    for m0 in range(row0, m_end, BLOCK_M):
        pos = m0 + offs_r
        tok, slot, valid, first = _slot_rows(pos, m_end, order_row, d_row, stride_dt, starts_row, T, T_out)
        local = carry + tl.cumsum(first.to(tl.int32), axis=0) - 1
        owned = valid & (local >= 0)
        sel = (local[None, :] == offs_j[:, None]) & owned[None, :]
        w = _pool_weights(tok, owned, b, size_ptr, stride_sb, stride_st, attn_m_ptr, stride_mb, stride_mt, smax,
                          MODE, HAS_SIZE)
        den += tl.sum(tl.where(sel, w.to(ACC_DTYPE)[None, :], 0.0), axis=1)
        slot_of = tl.maximum(slot_of, tl.max(tl.where(sel, slot[None, :], -1), axis=1))
        carry += tl.sum(first.to(tl.int32), axis=0)

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_dk = tl.arange(0, BLOCK_DK)
    mask_dk = offs_dk < D_QK
    p_row = attn_ptr + b * stride_ab + h * stride_ah
    v_row = v_ptr + b * stride_vb + h * stride_vh
    q_row = q_ptr + b * stride_qb + h * stride_qh
    k_row = k_ptr + b * stride_kb + h * stride_kh
    logs_row = logs_ptr + b * stride_lb

    # Pass 2: flash-style P @ V'[dest] for the rows, pooled into the owned slots.
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    carry = 0
    for m0 in range(row0, m_end, BLOCK_M):
        pos = m0 + offs_r
        tok, slot, valid, first = _slot_rows(pos, m_end, order_row, d_row, stride_dt, starts_row, T, T_out)
        local = carry + tl.cumsum(first.to(tl.int32), axis=0) - 1
        owned = valid & (local >= 0)
        sel = (local[None, :] == offs_j[:, None]) & owned[None, :]
        carry += tl.sum(first.to(tl.int32), axis=0)
        w = _pool_weights(tok, owned, b, size_ptr, stride_sb, stride_st, attn_m_ptr, stride_mb, stride_mt, smax,
                          MODE, HAS_SIZE)
        den_m = tl.sum(tl.where(sel, den[:, None], 0.0), axis=0)
        # A slot whose weights sum to 0 gets NaN below (as the reference's 0/0); its
        # rows contribute 0 here so no NaN reaches the other slots through the dot.
        wn = tl.where(owned & (den_m > 0), w.to(ACC_DTYPE) / tl.where(den_m > 0, den_m, 1.0), 0.0)

        if FROM_QK:
            qs = scaled_queries(q_row, tok, owned, stride_qt, stride_qd, offs_dk, mask_dk, scale)
            lse = tl.load(lse_ptr + b * stride_eb + h * stride_eh + tok * stride_et, mask=owned, other=0.0)
        o = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
        for k0 in range(0, T, BLOCK_N):
            offs_k = k0 + tl.arange(0, BLOCK_N)
            mask_k = offs_k < T
            if FROM_QK:  # P tile = exp(s - lse); keys past T have s = -inf
                kt = keys_t(k_row, offs_k, mask_k, stride_kt, stride_kd, offs_dk, mask_dk)
                logits = logits_tile(qs, kt, key_bias(logs_row, offs_k, mask_k, stride_lt, HAS_LOG_SIZE),
                                     QK_PRECISION)
                p = tl.exp(logits - lse.to(tl.float32)[:, None])
            else:
                # The reference multiplies attn.to(v.dtype) @ v: round P to V's dtype first.
                p = tl.load(p_row + tok[:, None] * stride_aq + offs_k[None, :] * stride_ak,
                            mask=owned[:, None] & mask_k[None, :], other=0.0).to(v_dtype).to(ACC_DTYPE)
            p = tl.where(owned[:, None], p * wn[:, None], 0.0)
            # Keys whose slot is outside [0, T') contribute nothing (and read nothing).
            kd = tl.load(d_row + offs_k * stride_dt, mask=mask_k, other=-1).to(tl.int64)
            mask_v = mask_k & (kd >= 0) & (kd < T_out)
            vt = tl.load(v_row + tl.where(mask_v, kd, 0)[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                         mask=mask_v[:, None] & mask_d[None, :], other=0.0)
            o = tl.dot(p.to(v_dtype), vt, o, input_precision=PV_PRECISION)
        acc = tl.dot(sel.to(v_dtype), o.to(v_dtype), acc, input_precision=PV_PRECISION)

    has_slot = slot_of >= 0
    out = tl.where((den > 0)[:, None], acc, float("nan"))  # all-zero weights: 0/0, as the reference
    dst = out_ptr + b * stride_ob + h * stride_oh + slot_of[:, None] * stride_ot + offs_d[None, :]
    tl.store(dst, out.to(out_dtype), mask=has_slot[:, None] & mask_d[None, :])
    tl.store(den_ptr + b * T_out + slot_of, den.to(tl.float32), mask=has_slot & (h == 0))

    # Slots with no member (never from match) get NaN, as the reference's 0/0: each
    # program checks its share of the slot ids.
    nan_row = tl.full([BLOCK_M, BLOCK_D], float("nan"), tl.float32).to(out_dtype)
    for s0 in range(tb * BLOCK_M, T_out, tl.num_programs(1) * BLOCK_M):
        offs_s = s0 + offs_j
        mask_s = offs_s < T_out
        lo = tl.load(starts_row + offs_s, mask=mask_s, other=0)
        hi = tl.load(starts_row + offs_s + 1, mask=mask_s, other=0)
        empty = mask_s & (hi <= lo)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_ot + offs_d[None, :], nan_row,
                 mask=empty[:, None] & mask_d[None, :])
        tl.store(den_ptr + b * T_out + offs_s, tl.zeros([BLOCK_M], tl.float32), mask=empty & (h == 0))
