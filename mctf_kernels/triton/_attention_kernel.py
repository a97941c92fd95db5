"""Triton kernels of the attention-side ops (docs/algorithm.md, "One-step-ahead attention").

- ``_attention_received_kernel``: column sums of P (B, H, T, T) per head; the
  launcher sums the H partials in a fixed order (no atomics, deterministic).
- ``_fused_attention_output_kernel``: P' @ V' = rowmerge(P @ V'[dest]) in one pass,
  flash-style over the queries taken in slot order (the slot index ``order``), so a
  64-row query tile is full and a slot's members are consecutive rows; its epilogue
  pools those rows into their slots. P' is never formed, V'[dest] never gathered into
  memory. It serves ``fused_attention_output``, where P is formed (training with attention
  dropout); the model's flash path, ``fused_attention_output_qk``, is gather + torch's
  fused attention + the merge kernel (``flash_attention.py``).
"""
import triton
import triton.language as tl

EPS = tl.constexpr(1e-12)  # floor of the mode-1 size normaliser, as mctf_kernels.merge.EPS


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
    """For query positions ``pos`` (int32) in slot order: the token, its slot, whether it
    counts (inside [.., m_end) with a slot in [0, T')), and whether it is its slot's first
    member. Every index is clamped: no ``order`` / ``dest`` / ``starts`` value reads out
    of bounds. int32 indices: half the registers of int64 (T < 2**31)."""
    in_rows = pos < m_end
    tok = tl.load(order_row + pos, mask=in_rows, other=0)
    tok = tl.minimum(tl.maximum(tok, 0), T - 1).to(tl.int32)
    slot = tl.load(d_row + tok * stride_dt, mask=in_rows, other=-1)
    valid = in_rows & (slot >= 0) & (slot < T_out)
    slot = tl.where(valid, slot, 0).to(tl.int32)
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
def _rows_times_values(
    tok, wn, owned,
    p_row, stride_aq, stride_ak,
    v_row, stride_vt, stride_vd, d_row, stride_dt,
    T, T_out, D,
    PV_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """(wn * P[tok, :]) @ V'[dest[:]] for BLOCK_M query rows, flash-style over key tiles:
    (BLOCK_M, BLOCK_D) in ACC_DTYPE. P is scaled by the row weights before it is rounded
    to V's dtype; rows not ``owned`` are zero."""
    v_dtype = v_row.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    o = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    for k0 in range(0, T, BLOCK_N):
        offs_k = k0 + tl.arange(0, BLOCK_N)
        mask_k = offs_k < T
        # The reference multiplies attn.to(v.dtype) @ v: round P to V's dtype first.
        p = tl.load(p_row + tok[:, None] * stride_aq + offs_k[None, :] * stride_ak,
                    mask=owned[:, None] & mask_k[None, :], other=0.0).to(v_dtype).to(ACC_DTYPE)
        p = tl.where(owned[:, None], p * wn[:, None], 0.0)
        # Keys whose slot is outside [0, T') contribute nothing (and read nothing).
        kd = tl.load(d_row + offs_k * stride_dt, mask=mask_k, other=-1)
        mask_v = mask_k & (kd >= 0) & (kd < T_out)
        kd = tl.where(mask_v, kd, 0).to(tl.int32)
        vt = tl.load(v_row + kd[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                     mask=mask_v[:, None] & mask_d[None, :], other=0.0)
        o = tl.dot(p.to(v_dtype), vt, o, input_precision=PV_PRECISION)
    return o


@triton.jit
def _fused_attention_output_kernel(
    attn_ptr, stride_ab, stride_ah, stride_aq, stride_ak,  # P (B, H, T, T)
    v_ptr, stride_vb, stride_vh, stride_vt, stride_vd,
    dest_ptr, stride_db, stride_dt,
    order_ptr, starts_ptr,  # slot index of dest: contiguous (B, T) and (B, T'+1) int64
    size_ptr, stride_sb, stride_st,
    attn_m_ptr, stride_mb, stride_mt,
    out_ptr, stride_ob, stride_oh, stride_ot,  # out's channel stride is 1
    den_ptr,  # (B, T') float32: slot sums of the pooling weights
    H, T, T_out, D,
    MODE: tl.constexpr,  # 0 size, 1 attention*size, 3 mean (max does not factor)
    HAS_SIZE: tl.constexpr,
    PV_PRECISION: tl.constexpr,  # "ieee" or "tf32" for float32 P @ V (as torch's matmul setting)
    ACC_DTYPE: tl.constexpr,  # float32, or float64 for float64 V (gradcheck)
    BLOCK_M: tl.constexpr,  # query rows per tile, in slot order
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens per step of the max-size scan (mode 1 with sizes)
):
    # Program (b, h, tile) takes the query rows at positions [row0, row0 + BLOCK_M) of
    # the slot order and owns the slots whose first member lies there (at most BLOCK_M).
    # Owned slot j gets  out_j = sum_m sel[j, m] * (w_m / den_j) * P[q_m, :] @ V'[dest]:
    # the weights are folded into P before P is rounded to V's dtype (w / den <= 1: no
    # underflow) and the row merge is a 0/1 dot, exact in any dtype. The last owned
    # slot may run past the tile; its further members are summed into that one row in
    # extra steps (a tile boundary inside a multi-member slot: ~7% of tiles over DeiT's
    # r = 16 schedule, an estimate from the reference matcher on random tokens).
    bh = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
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
            mx = tl.full([BLOCK_T], EPS, tl.float32)  # floored: all-zero sizes do not give 0/0
            for t0 in range(0, T, BLOCK_T):
                offs_t = t0 + tl.arange(0, BLOCK_T)
                sz = tl.load(size_ptr + b * stride_sb + offs_t * stride_st, mask=offs_t < T, other=EPS)
                sz = sz.to(tl.float32)
                mx = tl.where(sz > mx, sz, mx)  # skips NaN: one bad size stays in its own slot
            smax = tl.max(mx, axis=0)

    # The member range: past the tile only when the tile's last row is in a slot owned here.
    _t, slot_last, valid_last, _f = _slot_rows(tile_end - 1 + tl.zeros([1], tl.int32), T, order_row, d_row,
                                               stride_dt, starts_row, T, T_out)
    last_start = tl.load(starts_row + slot_last, mask=valid_last, other=-1)
    last_end = tl.load(starts_row + slot_last + 1, mask=valid_last, other=0).to(tl.int32)
    last_end = tl.minimum(tl.maximum(last_end, tile_end), T)
    m_end = tl.max(tl.where(valid_last & (last_start >= row0), last_end, tile_end), axis=0)
    overhang = m_end > tile_end

    offs_j = tl.arange(0, BLOCK_M)  # owned slot (local index); also the row in a step

    # Pass 1 (indices and weights only): each owned slot's id, weight sum and member count.
    den = tl.zeros([BLOCK_M], ACC_DTYPE)
    cnt = tl.zeros([BLOCK_M], tl.int32)
    slot_of = tl.full([BLOCK_M], -1, tl.int32)
    n_owned = 0
    for m0 in range(row0, m_end, BLOCK_M):
        tok, slot, valid, first = _slot_rows(m0 + offs_j, m_end, order_row, d_row, stride_dt, starts_row, T, T_out)
        local = n_owned + tl.cumsum(first.to(tl.int32), axis=0) - 1
        owned = valid & (local >= 0)
        sel = (local[None, :] == offs_j[:, None]) & owned[None, :]
        w = _pool_weights(tok, owned, b, size_ptr, stride_sb, stride_st, attn_m_ptr, stride_mb, stride_mt, smax,
                          MODE, HAS_SIZE)
        den += tl.sum(tl.where(sel, w.to(ACC_DTYPE)[None, :], 0.0), axis=1)
        cnt += tl.sum(sel.to(tl.int32), axis=1)
        slot_of = tl.maximum(slot_of, tl.max(tl.where(sel, slot[None, :], -1), axis=1))
        n_owned += tl.sum(first.to(tl.int32), axis=0)
    last = n_owned - 1

    p_row = attn_ptr + b * stride_ab + h * stride_ah
    v_row = v_ptr + b * stride_vb + h * stride_vh
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    has_slot = slot_of >= 0

    # Pass 2, the tile's rows: flash-style P @ V'[dest], pooled into the owned slots.
    tok, slot, valid, first = _slot_rows(row0 + offs_j, tile_end, order_row, d_row, stride_dt, starts_row, T, T_out)
    local = tl.cumsum(first.to(tl.int32), axis=0) - 1
    owned = valid & (local >= 0)
    w = _pool_weights(tok, owned, b, size_ptr, stride_sb, stride_st, attn_m_ptr, stride_mb, stride_mt, smax,
                      MODE, HAS_SIZE)
    # A slot whose weights sum to exactly 0 is its members' unweighted mean: weight 1 each,
    # over its member count (a zero-weight owned slot has >= 1 member: no 0/0).
    unweighted = den == 0
    den_eff = tl.where(unweighted, cnt.to(ACC_DTYPE), den)
    of_row = local[None, :] == offs_j[:, None]
    den_m = tl.sum(tl.where(of_row, den_eff[:, None], 0.0), axis=0)
    unw_m = tl.max(tl.where(of_row, unweighted.to(tl.int32)[:, None], 0), axis=0) > 0
    w = tl.where(unw_m, 1.0, w.to(ACC_DTYPE))
    wn = tl.where(owned, w / tl.where(owned, den_m, 1.0), 0.0)
    o = _rows_times_values(tok, wn, owned, p_row, stride_aq, stride_ak,
                           v_row, stride_vt, stride_vd, d_row, stride_dt, T, T_out, D,
                           PV_PRECISION, ACC_DTYPE, BLOCK_M, BLOCK_N, BLOCK_D)
    # NaN/inf rows (a NaN in P or a weight; or a row overflowing V's dtype) are zeroed
    # before the 0/1 dot, where 0 * NaN would reach every slot of the tile, and their
    # slots are flagged instead: a NaN reaches only its own slot's row, as in the reference.
    o_v = o.to(v_dtype)
    o_f = o_v.to(ACC_DTYPE)
    bad = tl.max(tl.where(o_f - o_f == 0, 0, 1), axis=1)  # x - x is NaN for NaN and +-inf
    o_v = tl.where(bad[:, None] > 0, 0.0, o_v).to(v_dtype)
    sel = of_row & owned[None, :]
    pooled = tl.dot(sel.to(v_dtype), o_v, input_precision=PV_PRECISION, out_dtype=ACC_DTYPE)
    slot_bad = tl.max(tl.where(sel, bad[None, :], 0), axis=1) > 0
    out = tl.where(slot_bad[:, None], float("nan"), pooled)
    dst = out_ptr + b * stride_ob + h * stride_oh + slot_of[:, None] * stride_ot + offs_d[None, :]
    keep = has_slot & ((offs_j != last) | (m_end <= tile_end))  # an overhanging last slot: stored below
    tl.store(dst, out.to(out_dtype), mask=keep[:, None] & mask_d[None, :])
    tl.store(den_ptr + b * T_out + slot_of, den.to(tl.float32), mask=has_slot & (h == 0))

    # Overhang: the last owned slot's members past the tile, all in that one slot.
    if overhang:
        den_last = tl.sum(tl.where(offs_j == last, den_eff, 0.0), axis=0)
        unw_last = tl.max(tl.where(offs_j == last, unweighted.to(tl.int32), 0), axis=0) > 0
        row = tl.sum(tl.where((offs_j == last)[:, None], out, 0.0), axis=0)
        for m0 in range(tile_end, m_end, BLOCK_M):
            tok, slot, valid, first = _slot_rows(m0 + offs_j, m_end, order_row, d_row, stride_dt, starts_row,
                                                 T, T_out)
            w = _pool_weights(tok, valid, b, size_ptr, stride_sb, stride_st, attn_m_ptr, stride_mb, stride_mt,
                              smax, MODE, HAS_SIZE)
            wn = tl.where(unw_last, 1.0, w.to(ACC_DTYPE)) / den_last
            o = _rows_times_values(tok, wn, valid, p_row, stride_aq, stride_ak,
                                   v_row, stride_vt, stride_vd, d_row, stride_dt, T, T_out, D,
                                   PV_PRECISION, ACC_DTYPE, BLOCK_M, BLOCK_N, BLOCK_D)
            row += tl.sum(o.to(v_dtype).to(ACC_DTYPE), axis=0)  # rounded as the tile's rows
        slot_l = tl.max(tl.where(offs_j == last, slot_of, -1), axis=0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + slot_l * stride_ot + offs_d, row.to(out_dtype),
                 mask=mask_d & (slot_l >= 0))

    # Slots with no member (never from match) get NaN, as the reference's 0/0: each
    # program checks its share of the slot ids.
    nan_rows = tl.full([BLOCK_M, BLOCK_D], float("nan"), tl.float32).to(out_dtype)
    for s0 in range(row0, T_out, tl.num_programs(1) * BLOCK_M):
        offs_s = s0 + offs_j
        mask_s = offs_s < T_out
        lo = tl.load(starts_row + offs_s, mask=mask_s, other=0)
        hi = tl.load(starts_row + offs_s + 1, mask=mask_s, other=0)
        empty = mask_s & (hi <= lo)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_ot + offs_d[None, :], nan_rows,
                 mask=empty[:, None] & mask_d[None, :])
        tl.store(den_ptr + b * T_out + offs_s, tl.zeros([BLOCK_M], tl.float32), mask=empty & (h == 0))
