"""Triton kernels for fused multi-criteria score + bipartite matching (SPEC 3-4).

The launcher (``match.py``) runs, per batch element, in this order:
0. ``_token_stats_kernel``: per-token norm, informativeness and size factor (B, T).
1. ``_row_max_kernel``: stage-1 ``node_max``/``node_idx`` (max/argmax over B of each A row).
2. ``_rank_kernel``: rank of every A token in the stable descending order of ``node_max``.
3. ``_col_max_kernel`` (bidirectional only): ``node_max2``/``node_idx2`` over unmerged A.
4. ``_assign_kernel``: the slot of every token (ranks of B computed on the fly),
   plus the protected-first remap.
Score tiles are recomputed in stages 1 and 3; the (t1, t2) matrix never
reaches global memory. Only O(B*T) scratch is written between stages.

Numerics follow ``scores_reference`` op by op (IEEE division and sqrt, fp32
``tl.dot`` without TF32, the same special cases of ``pow``), so that the slot
maps agree exactly except for near-ties that a different summation order of
the dot product could flip.
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

# Pow modes, chosen on the host from float32(1 / tau) like torch's pow does:
# torch special-cases exponents 1 (copy), 0.5 (sqrt), 2 and 3 (products).
POW_OFF = 0  # criterion disabled (tau = 0 or no input): factor 1
POW_ONE = 1
POW_SQRT = 2
POW_SQUARE = 3
POW_CUBE = 4
POW_GENERAL = 5

# Clamp of norms and attention, as in mctf_kernels.scores.EPS.
EPS = tl.constexpr(1e-12)
# Larger than any position in the unmerged list (int32): the neutral value of a min.
BIG_POS = tl.constexpr(2147483647)


@triton.jit
def _div(x, y):
    """IEEE division (Triton's '/' is approximate on GPU; div_rn does not broadcast)."""
    x, y = tl.broadcast(x, y)
    return tl.math.div_rn(x, y)


@triton.jit
def _pow(base, e, MODE: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    if MODE == 1:
        out = base
    elif MODE == 2:
        out = tl.sqrt_rn(base)
    elif MODE == 3:
        out = base * base
    elif MODE == 4:
        out = base * base * base
    else:
        if USE_LIBDEVICE:
            # __nv_powf: the function torch's CUDA pow calls, so results match bitwise.
            out = libdevice.pow(base, e)
        else:
            # The interpreter has no libdevice; float64 log/exp rounds to the
            # correctly rounded powf in practice (torch's CPU pow is within 1 ulp).
            out = tl.exp2(tl.log2(base.to(tl.float64)) * e).to(tl.float32)
    return out


@triton.jit
def _score_tile(
    x_ptr, stats_ptr, a_idx, b_idx, t1, t2, T, C, num_protected,
    stride_xt, stride_xc, e_sim, e_info, e_size,
    SIM_MODE: tl.constexpr, INFO_MODE: tl.constexpr, SIZE_MODE: tl.constexpr,
    HAS_PROT: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """score[a, b] for a tile of A indices (rows) and B indices (columns), fp32.

    x_ptr and stats_ptr already point at this batch element; stats holds three
    rows of T floats: norm, informativeness, size factor. Padding is -inf.
    """
    a_ok = a_idx < t1
    b_ok = b_idx < t2
    a_tok = (2 * a_idx).to(tl.int64)  # A = even tokens
    b_tok = (2 * b_idx + 1).to(tl.int64)  # B = odd tokens
    if SIM_MODE != 0:
        na = tl.load(stats_ptr + a_tok, mask=a_ok, other=1.0)
        nb = tl.load(stats_ptr + b_tok, mask=b_ok, other=1.0)
        acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < C
            xa = tl.load(x_ptr + a_tok[:, None] * stride_xt + c[None, :] * stride_xc,
                         mask=a_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            # B tile loaded transposed (C, BLOCK_B) so tl.dot needs no permute.
            xb = tl.load(x_ptr + b_tok[None, :] * stride_xt + c[:, None] * stride_xc,
                         mask=b_ok[None, :] & c_ok[:, None], other=0.0).to(tl.float32)
            # Normalise before the dot, like the reference (m = x / ||x||).
            xa = _div(xa, na[:, None])
            xb = _div(xb, nb[None, :])
            # "ieee": no TF32, else the ranking would drift from the fp32 reference.
            acc = tl.dot(xa, xb, acc, input_precision="ieee")
        # (cos + 1) / 2 (halving is exact), clamped: rounding can push cos below -1.
        s = tl.maximum((acc + 1.0) * 0.5, 0.0)
        s = _pow(s, e_sim, SIM_MODE, USE_LIBDEVICE)
    else:
        s = tl.full((BLOCK_A, BLOCK_B), 1.0, dtype=tl.float32)
    # The reference multiplies W_info, then W_size, each as pow(i_a * i_b).
    if INFO_MODE != 0:
        ia = tl.load(stats_ptr + T + a_tok, mask=a_ok, other=1.0)
        ib = tl.load(stats_ptr + T + b_tok, mask=b_ok, other=1.0)
        s = s * _pow(ia[:, None] * ib[None, :], e_info, INFO_MODE, USE_LIBDEVICE)
    if SIZE_MODE != 0:
        za = tl.load(stats_ptr + 2 * T + a_tok, mask=a_ok, other=1.0)
        zb = tl.load(stats_ptr + 2 * T + b_tok, mask=b_ok, other=1.0)
        s = s * _pow(za[:, None] * zb[None, :], e_size, SIZE_MODE, USE_LIBDEVICE)
    keep = a_ok[:, None] & b_ok[None, :]
    if HAS_PROT:
        # Protected prefix tokens: A rows 0, 2, ... and B columns 1, 3, ... below num_protected.
        keep = keep & (a_idx[:, None] >= (num_protected + 1) // 2) & (b_idx[None, :] >= num_protected // 2)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _token_stats_kernel(
    x_ptr, attn_ptr, size_ptr, stats_ptr, T, C,
    stride_xb, stride_xt, stride_xc, stride_ab, stride_at, stride_sb, stride_st,
    HAS_INFO: tl.constexpr, HAS_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """stats[b] = [norm (clamped), i = inv_attn / max inv_attn, z = inv_size / max inv_size]."""
    pid_b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    x_row = x_ptr + pid_b * stride_xb + t.to(tl.int64)[:, None] * stride_xt
    sq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        xv = tl.load(x_row + c[None, :] * stride_xc, mask=t_ok[:, None] & (c[None, :] < C), other=0.0).to(tl.float32)
        sq += tl.sum(xv * xv, axis=1)
    out = stats_ptr + pid_b * 3 * T
    tl.store(out + t, tl.maximum(tl.sqrt_rn(sq), EPS), mask=t_ok)
    if HAS_INFO:
        # Every program recomputes the row max (O(T) loads): no extra launch or sync.
        row = attn_ptr + pid_b * stride_ab
        mx = tl.full((BLOCK_R,), 0.0, dtype=tl.float32)
        for j0 in range(0, T, BLOCK_R):
            j = j0 + tl.arange(0, BLOCK_R)
            w = tl.load(row + j * stride_at, mask=j < T, other=1.0).to(tl.float32)
            mx = tl.maximum(mx, tl.where(j < T, _div(tl.full(w.shape, 1.0, tl.float32), tl.maximum(w, EPS)), 0.0))
        mx_all = tl.max(mx, axis=0)
        v = tl.load(row + t * stride_at, mask=t_ok, other=1.0).to(tl.float32)
        tl.store(out + T + t, _div(_div(tl.full(v.shape, 1.0, tl.float32), tl.maximum(v, EPS)), mx_all), mask=t_ok)
    if HAS_SIZE:
        row = size_ptr + pid_b * stride_sb
        mx = tl.full((BLOCK_R,), 0.0, dtype=tl.float32)
        for j0 in range(0, T, BLOCK_R):
            j = j0 + tl.arange(0, BLOCK_R)
            w = tl.load(row + j * stride_st, mask=j < T, other=1.0).to(tl.float32)
            mx = tl.maximum(mx, tl.where(j < T, _div(tl.full(w.shape, 1.0, tl.float32), w), 0.0))
        mx_all = tl.max(mx, axis=0)
        v = tl.load(row + t * stride_st, mask=t_ok, other=1.0).to(tl.float32)
        tl.store(out + 2 * T + t, _div(_div(tl.full(v.shape, 1.0, tl.float32), v), mx_all), mask=t_ok)


@triton.jit
def _row_max_kernel(
    x_ptr, stats_ptr, node_max_ptr, node_idx_ptr, t1, t2, T, C, num_protected,
    stride_xb, stride_xt, stride_xc, e_sim, e_info, e_size,
    SIM_MODE: tl.constexpr, INFO_MODE: tl.constexpr, SIZE_MODE: tl.constexpr,
    HAS_PROT: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Stage 1: node_max[a], node_idx[a] = max / argmax_b score[a, b] (lowest b on ties)."""
    pid_b = tl.program_id(0).to(tl.int64)
    a_idx = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    x_b = x_ptr + pid_b * stride_xb
    stats_b = stats_ptr + pid_b * 3 * T
    best = tl.full((BLOCK_A,), float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_A,), dtype=tl.int32)
    for b0 in range(0, t2, BLOCK_B):
        b_idx = b0 + tl.arange(0, BLOCK_B)
        s = _score_tile(x_b, stats_b, a_idx, b_idx, t1, t2, T, C, num_protected,
                        stride_xt, stride_xc, e_sim, e_info, e_size,
                        SIM_MODE, INFO_MODE, SIZE_MODE, HAS_PROT, USE_LIBDEVICE,
                        BLOCK_A, BLOCK_B, BLOCK_C)
        tile_max = tl.max(s, axis=1)
        tile_idx = tl.argmax(s, axis=1, tie_break_left=True).to(tl.int32) + b0
        # Strictly greater: tiles come in ascending b, so ties keep the lower index.
        better = tile_max > best
        best = tl.where(better, tile_max, best)
        best_idx = tl.where(better, tile_idx, best_idx)
    a_ok = a_idx < t1
    tl.store(node_max_ptr + pid_b * t1 + a_idx, best, mask=a_ok)
    tl.store(node_idx_ptr + pid_b * t1 + a_idx, best_idx, mask=a_ok)


@triton.jit
def _rank_of(key, idx, keys_ptr, n, BLOCK_J: tl.constexpr):
    """Position of (key, idx) in the stable descending order of keys_ptr[0:n]:
    #{j : keys[j] > key or (keys[j] == key and j < idx)}."""
    rank = tl.zeros(key.shape, dtype=tl.int32)
    for j0 in range(0, n, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        kj = tl.load(keys_ptr + j, mask=j < n, other=float("-inf"))
        beats = (kj[None, :] > key[:, None]) | ((kj[None, :] == key[:, None]) & (j[None, :] < idx[:, None]))
        rank += tl.sum((beats & (j[None, :] < n)).to(tl.int32), axis=1)
    return rank


@triton.jit
def _rank_kernel(keys_ptr, rank_ptr, n, BLOCK: tl.constexpr, BLOCK_J: tl.constexpr):
    """Stage 2: rank of every A token by node_max, descending and stable."""
    pid_b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keys = keys_ptr + pid_b * n
    key = tl.load(keys + i, mask=i < n, other=float("-inf"))
    rank = _rank_of(key, i, keys, n, BLOCK_J)
    tl.store(rank_ptr + pid_b * n + i, rank, mask=i < n)


@triton.jit
def _col_max_kernel(
    x_ptr, stats_ptr, rank_a_ptr, node_max2_ptr, node_idx2_ptr, t1, t2, T, C, num_protected, r1,
    stride_xb, stride_xt, stride_xc, e_sim, e_info, e_size,
    SIM_MODE: tl.constexpr, INFO_MODE: tl.constexpr, SIZE_MODE: tl.constexpr,
    HAS_PROT: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Stage 3: for each B token, max over unmerged A tokens and the argmax as a
    position in the unmerged list (lowest position on ties)."""
    pid_b = tl.program_id(0).to(tl.int64)
    b_idx = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    x_b = x_ptr + pid_b * stride_xb
    stats_b = stats_ptr + pid_b * 3 * T
    best = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    best_pos = tl.full((BLOCK_B,), BIG_POS, dtype=tl.int32)
    n_before = tl.full((), 0, dtype=tl.int32)  # unmerged A tokens before this tile (HAS_PROT)
    for a0 in range(0, t1, BLOCK_A):
        a_idx = a0 + tl.arange(0, BLOCK_A)
        rank = tl.load(rank_a_ptr + pid_b * t1 + a_idx, mask=a_idx < t1, other=0)
        unm = (rank >= r1) & (a_idx < t1)
        if HAS_PROT:
            # Unmerged tokens are re-sorted by index: position = #unmerged before it.
            unm_i = unm.to(tl.int32)
            pos = n_before + tl.cumsum(unm_i, axis=0) - unm_i
            n_before += tl.sum(unm_i, axis=0)
        else:
            pos = rank - r1  # unmerged tokens stay in descending-score order
        s = _score_tile(x_b, stats_b, a_idx, b_idx, t1, t2, T, C, num_protected,
                        stride_xt, stride_xc, e_sim, e_info, e_size,
                        SIM_MODE, INFO_MODE, SIZE_MODE, HAS_PROT, USE_LIBDEVICE,
                        BLOCK_A, BLOCK_B, BLOCK_C)
        s = tl.where(unm[:, None], s, float("-inf"))
        tile_max = tl.max(s, axis=0)
        # Sources are excluded by position, not only by -inf: a column that is -inf
        # on every unmerged row must still pick the first unmerged position.
        cand = tl.where(unm[:, None] & (s == tile_max[None, :]), pos[:, None], BIG_POS)
        tile_pos = tl.min(cand, axis=0)
        better = tile_max > best
        tie = tile_max == best
        best_pos = tl.where(better, tile_pos, tl.where(tie, tl.minimum(best_pos, tile_pos), best_pos))
        best = tl.maximum(best, tile_max)
    b_ok = b_idx < t2
    tl.store(node_max2_ptr + pid_b * t2 + b_idx, best, mask=b_ok)
    tl.store(node_idx2_ptr + pid_b * t2 + b_idx, best_pos, mask=b_ok)


@triton.jit
def _raw_slot(
    t, t_ok, rank_a_ptr, node_idx_ptr, node_max2_ptr, node_idx2_ptr, t1, t2, r1, r2,
    BIDIR: tl.constexpr, HAS_PROT: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Output slot of tokens t before the protected-first remap (pointers at this batch)."""
    is_a = (t % 2) == 0
    half = t // 2  # index within A (even t) or B (odd t)
    n_unm = t1 - r1
    rank_a = tl.load(rank_a_ptr + half, mask=t_ok & is_a, other=0)
    src = is_a & (rank_a < r1)
    if HAS_PROT:
        # Unmerged A sorted by index: position = index - #sources with a lower index.
        n_src = tl.zeros(t.shape, dtype=tl.int32)
        for j0 in range(0, t1, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            rj = tl.load(rank_a_ptr + j, mask=j < t1, other=r1)
            lower_src = (rj[None, :] < r1) & (j[None, :] < half[:, None])
            n_src += tl.sum(lower_src.to(tl.int32), axis=1)
        pos = half - n_src
    else:
        pos = rank_a - r1
    # A source takes the slot of the B token it merges into; B tokens their own.
    dst = tl.load(node_idx_ptr + half, mask=t_ok & src, other=0)
    tb = tl.where(is_a, dst, half)
    needs_b = t_ok & (src | ~is_a)
    if BIDIR:
        key = tl.load(node_max2_ptr + tb, mask=needs_b, other=float("-inf"))
        rank_b = _rank_of(key, tb, node_max2_ptr, t2, BLOCK_J)
        to_a = tl.load(node_idx2_ptr + tb, mask=needs_b, other=0)
        # First r2 B tokens merge into their unmerged A token (slot = its position);
        # the rest follow the unmerged A tokens in stage-2 order.
        slot_b = tl.where(rank_b < r2, to_a, n_unm + rank_b - r2)
    else:
        slot_b = n_unm + tb
    return tl.where(is_a & ~src, pos, slot_b)


@triton.jit
def _assign_kernel(
    rank_a_ptr, node_idx_ptr, node_max2_ptr, node_idx2_ptr, dest_ptr,
    T, t1, t2, r1, r2, num_protected,
    BIDIR: tl.constexpr, HAS_PROT: tl.constexpr, REMAP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Stage 4: dest[t] for a block of tokens, with the protected-first remap."""
    pid_b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    rank_a_b = rank_a_ptr + pid_b * t1
    node_idx_b = node_idx_ptr + pid_b * t1
    node_max2_b = node_max2_ptr + pid_b * t2
    node_idx2_b = node_idx2_ptr + pid_b * t2
    slot = _raw_slot(t, t_ok, rank_a_b, node_idx_b, node_max2_b, node_idx2_b, t1, t2, r1, r2,
                     BIDIR, HAS_PROT, BLOCK_J)
    if REMAP:
        # Prefix token k goes to slot k; other slots keep their order after them:
        # new = num_protected + slot - #(prefix slots below slot).
        prefix_k = tl.full((BLOCK_T,), -1, dtype=tl.int32)
        n_below = tl.zeros((BLOCK_T,), dtype=tl.int32)
        for p0 in range(0, num_protected, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            p_ok = p < num_protected
            p_slot = _raw_slot(p, p_ok, rank_a_b, node_idx_b, node_max2_b, node_idx2_b, t1, t2, r1, r2,
                               BIDIR, HAS_PROT, BLOCK_J)
            hit = p_ok[None, :] & (p_slot[None, :] == slot[:, None])
            prefix_k = tl.maximum(prefix_k, tl.max(tl.where(hit, p[None, :], -1), axis=1))
            n_below += tl.sum((p_ok[None, :] & (p_slot[None, :] < slot[:, None])).to(tl.int32), axis=1)
        slot = tl.where(prefix_k >= 0, prefix_k, num_protected + slot - n_below)
    tl.store(dest_ptr + pid_b * T + t, slot.to(tl.int64), mask=t_ok)
