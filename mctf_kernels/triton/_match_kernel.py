"""Triton kernels for fused multi-criteria score + bipartite matching
(docs/algorithm.md, "Scores" and "Matching").

Two designs, chosen by the launcher (``match.py``) from T:

- ``_match_fused_kernel`` (t1, t2 <= 128, every 224 px /16 model): ONE launch, one
  program per image. Token stats, the (t1, t2) scores (each computed once, BLOCK_M
  rows at a time (32 or 64 on a GPU, ``configs.match_configs``), and kept in a per-image fp32 scratch that stays in L2 for the column
  pass: the whole 128 x 128 tile in registers spills), row max/argmax, the rank of
  A, the column max over unmerged A, the rank of B and the slot map, and on request
  (WITH_SLOTS) the map's slot index. Vectors that must be read in another order than they are
  held (keys to rank, raw slots to gather) go through O(T) global scratch written
  and read back by the same program across ``tl.debug_barrier()``.
- the tiled path for larger T (4-5 launches): ``_token_stats_kernel``,
  ``_row_max_kernel``, ``_rank_kernel``, ``_col_max_kernel`` (bidirectional only),
  ``_assign_kernel``; score tiles are recomputed in the row and column passes,
  only O(B*T) scratch goes between launches. Recomputing is kept on purpose: at
  T = 577 the fp32 score matrix is 85 MB at B = 256 (H100 L2: 50 MB), and a second pass of
  tensor-core dots and two pows per element is estimated (not measured) to cost
  about what writing and re-reading it from HBM would.

Numerics (docs/algorithm.md, "Precision"). ``DOT_DTYPE`` is the compute dtype of
the similarity:
- fp32: the reference op by op (IEEE division and sqrt, fp32 ``tl.dot`` without
  TF32, the same special cases of ``pow``), so slot maps agree exactly except for
  near-ties that a different summation order of the dot product could flip.
- fp16/bf16 (autocast or a half model): m = x * (1 / ||x||) in fp32 rounded to
  the compute dtype, the dot on tensor cores with fp32 accumulation rounded to the
  compute dtype, (cos + 1) / 2 and the clamp rounded to the compute dtype, then
  ``pow`` and the info/size factors in fp32, as ``scores_reference`` does.

NaN scores (NaN or inf in the inputs) rank above every number and ties among them
go to the lower index, as torch's max and stable descending sort order NaN; the
kernels compare them as +inf, so no comparison is ever undefined and every slot
stays in [0, T - r).
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
# SIM_MODE only: the similarity is the raw cosine, no (cos + 1) / 2 and no power (ToMe's
# score, docs/algorithm.md "ToMe mode"); the launcher turns the other criteria off
SIM_COSINE = 6

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
    """torch's pow with its special cases. USE_LIBDEVICE: 0 interpreter, 1 GPU half
    path (MUFU log2/exp2, a few ulp from powf, within the half-precision bound and
    few registers), 2 GPU fp32 path (libdevice powf, torch's own: bitwise equal)."""
    if MODE == 1:
        out = base
    elif MODE == 2:
        out = tl.sqrt_rn(base)
    elif MODE == 3:
        out = base * base
    elif MODE == 4:
        out = base * base * base
    else:
        if USE_LIBDEVICE == 2:
            out = libdevice.pow(base, e)
        elif USE_LIBDEVICE == 1:
            out = tl.exp2(tl.log2(base) * e)
        else:
            # The interpreter has no libdevice; float64 log/exp rounds to the
            # correctly rounded powf in practice (torch's CPU pow is within 1 ulp).
            out = tl.exp2(tl.log2(base.to(tl.float64)) * e).to(tl.float32)
    return out


@triton.jit
def _sim_from_dot(acc, e_sim, SIM_MODE: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
                  HALF: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """W_sim from the fp32-accumulated cosine, with the reference's roundings."""
    if SIM_MODE == 6:  # SIM_COSINE: the cosine itself, rounded like the reference's matmul
        if HALF:
            out = acc.to(DOT_DTYPE).to(tl.float32)
        else:
            out = acc
        return out
    if HALF:
        # Each op of ((cos + 1) / 2).clamp_min(0) rounds to the compute dtype, as
        # torch's elementwise ops on half tensors do; halving is exact.
        base = acc.to(DOT_DTYPE).to(tl.float32)
        base = (base + 1.0).to(DOT_DTYPE).to(tl.float32)
        base = (base * 0.5).to(DOT_DTYPE).to(tl.float32)
    else:
        base = (acc + 1.0) * 0.5  # halving is exact: same as the reference's / 2
    # clamp: rounding can push cos below -1; NaN must stay NaN, like clamp_min.
    base = tl.maximum(base, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return _pow(base, e_sim, SIM_MODE, USE_LIBDEVICE)


@triton.jit
def _normalised(xv, norm, HALF: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """m = x / ||x|| as a dot operand. fp32: IEEE division (the reference's
    rounding). Half: one reciprocal per token and a multiply, rounded to the
    compute dtype (at most 1 fp32 ulp from x / ||x|| before a 2^-11 rounding)."""
    if HALF:
        rcp = _div(tl.full(norm.shape, 1.0, tl.float32), norm)
        out = (xv * rcp).to(DOT_DTYPE)
    else:
        out = _div(xv, norm)
    return out


@triton.jit
def _dot(xa, xb, acc, HALF: tl.constexpr):
    if HALF:
        acc = tl.dot(xa, xb, acc)  # tensor cores, fp32 accumulation
    else:
        # "ieee": no TF32, else the ranking would drift from the fp32 reference.
        acc = tl.dot(xa, xb, acc, input_precision="ieee")
    return acc


@triton.jit
def _finish_scores(s, a_idx, b_idx, a_ok, b_ok, num_protected, wa_info, wb_info, wa_size, wb_size,
                   e_info, e_size, INFO_MODE: tl.constexpr, SIZE_MODE: tl.constexpr,
                   HAS_PROT: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """W_sim * W_info * W_size (in the reference's order), NaN as +inf, padding and
    protected rows/columns -inf."""
    if INFO_MODE != 0:
        s = s * _pow(wa_info[:, None] * wb_info[None, :], e_info, INFO_MODE, USE_LIBDEVICE)
    if SIZE_MODE != 0:
        s = s * _pow(wa_size[:, None] * wb_size[None, :], e_size, SIZE_MODE, USE_LIBDEVICE)
    # NaN ranks first in torch's max and descending sort: compare it as +inf.
    s = tl.where(s != s, float("inf"), s)
    keep = a_ok[:, None] & b_ok[None, :]
    if HAS_PROT:
        # Protected prefix tokens: A rows 0, 2, ... and B columns 1, 3, ... below num_protected.
        keep = keep & (a_idx[:, None] >= (num_protected + 1) // 2) & (b_idx[None, :] >= num_protected // 2)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _score_tile(
    x_ptr, stats_ptr, a_idx, b_idx, t1, t2, T, C, num_protected,
    stride_xt, stride_xc, e_sim, e_info, e_size,
    SIM_MODE: tl.constexpr, INFO_MODE: tl.constexpr, SIZE_MODE: tl.constexpr,
    HAS_PROT: tl.constexpr, USE_LIBDEVICE: tl.constexpr, HALF: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """score[a, b] for a tile of A indices (rows) and B indices (columns), fp32
    (tiled path). x_ptr and stats_ptr already point at this batch element; stats
    holds three rows of T floats: norm, informativeness, size factor."""
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
            acc = _dot(_normalised(xa, na[:, None], HALF, DOT_DTYPE),
                       _normalised(xb, nb[None, :], HALF, DOT_DTYPE), acc, HALF)
        s = _sim_from_dot(acc, e_sim, SIM_MODE, USE_LIBDEVICE, HALF, DOT_DTYPE)
    else:
        s = tl.full((BLOCK_A, BLOCK_B), 1.0, dtype=tl.float32)
    ia = tl.load(stats_ptr + T + a_tok, mask=a_ok & (INFO_MODE != 0), other=1.0)
    ib = tl.load(stats_ptr + T + b_tok, mask=b_ok & (INFO_MODE != 0), other=1.0)
    za = tl.load(stats_ptr + 2 * T + a_tok, mask=a_ok & (SIZE_MODE != 0), other=1.0)
    zb = tl.load(stats_ptr + 2 * T + b_tok, mask=b_ok & (SIZE_MODE != 0), other=1.0)
    return _finish_scores(s, a_idx, b_idx, a_ok, b_ok, num_protected, ia, ib, za, zb, e_info, e_size,
                          INFO_MODE, SIZE_MODE, HAS_PROT, USE_LIBDEVICE)


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
    # NaN propagates through the clamps and maxima, as in torch's clamp_min and amax.
    tl.store(out + t, tl.maximum(tl.sqrt_rn(sq), EPS, propagate_nan=tl.PropagateNan.ALL), mask=t_ok)
    if HAS_INFO:
        # Every program recomputes the row max (O(T) loads): no extra launch or sync.
        row = attn_ptr + pid_b * stride_ab
        mx = tl.full((BLOCK_R,), 0.0, dtype=tl.float32)
        for j0 in range(0, T, BLOCK_R):
            j = j0 + tl.arange(0, BLOCK_R)
            w = tl.load(row + j * stride_at, mask=j < T, other=1.0).to(tl.float32)
            inv = _div(tl.full(w.shape, 1.0, tl.float32), tl.maximum(w, EPS, propagate_nan=tl.PropagateNan.ALL))
            mx = tl.maximum(mx, tl.where(j < T, inv, 0.0), propagate_nan=tl.PropagateNan.ALL)
        mx_all = _nan_max(mx, tl.full(mx.shape, 1, tl.int1))
        v = tl.load(row + t * stride_at, mask=t_ok, other=1.0).to(tl.float32)
        v = tl.maximum(v, EPS, propagate_nan=tl.PropagateNan.ALL)
        tl.store(out + T + t, _div(_div(tl.full(v.shape, 1.0, tl.float32), v), mx_all), mask=t_ok)
    if HAS_SIZE:
        row = size_ptr + pid_b * stride_sb
        mx = tl.full((BLOCK_R,), 0.0, dtype=tl.float32)
        for j0 in range(0, T, BLOCK_R):
            j = j0 + tl.arange(0, BLOCK_R)
            w = tl.load(row + j * stride_st, mask=j < T, other=1.0).to(tl.float32)
            mx = tl.maximum(mx, tl.where(j < T, _div(tl.full(w.shape, 1.0, tl.float32), w), 0.0),
                            propagate_nan=tl.PropagateNan.ALL)
        mx_all = _nan_max(mx, tl.full(mx.shape, 1, tl.int1))
        v = tl.load(row + t * stride_st, mask=t_ok, other=1.0).to(tl.float32)
        tl.store(out + 2 * T + t, _div(_div(tl.full(v.shape, 1.0, tl.float32), v), mx_all), mask=t_ok)


@triton.jit
def _row_max_kernel(
    x_ptr, stats_ptr, node_max_ptr, node_idx_ptr, t1, t2, T, C, num_protected,
    stride_xb, stride_xt, stride_xc, e_sim, e_info, e_size,
    SIM_MODE: tl.constexpr, INFO_MODE: tl.constexpr, SIZE_MODE: tl.constexpr,
    HAS_PROT: tl.constexpr, USE_LIBDEVICE: tl.constexpr, HALF: tl.constexpr, DOT_DTYPE: tl.constexpr,
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
                        SIM_MODE, INFO_MODE, SIZE_MODE, HAS_PROT, USE_LIBDEVICE, HALF, DOT_DTYPE,
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
    HAS_PROT: tl.constexpr, USE_LIBDEVICE: tl.constexpr, HALF: tl.constexpr, DOT_DTYPE: tl.constexpr,
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
                        SIM_MODE, INFO_MODE, SIZE_MODE, HAS_PROT, USE_LIBDEVICE, HALF, DOT_DTYPE,
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
    # BIG_POS only if no A token were unmerged, which r <= (T - num_protected) // 2 rules out.
    tl.store(node_idx2_ptr + pid_b * t2 + b_idx, tl.minimum(best_pos, t1 - r1 - 1), mask=b_ok)


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


# ---------------------------------------------------------------- single launch (small T)
@triton.jit
def _nan_max(v, ok):
    """max over the valid lanes, NaN if any is NaN (like torch's amax)."""
    v = tl.where(ok, v, float("-inf"))
    mx = tl.max(v, axis=0)
    has_nan = tl.sum((v != v).to(tl.int32), axis=0) > 0
    return tl.where(has_nan, float("nan"), mx)


@triton.jit
def _inverse(row_ptr, stride, tok, ok, CLAMP: tl.constexpr):
    """1 / attention (CLAMP: clamped first) or 1 / size of the tokens ``tok``."""
    v = tl.load(row_ptr + tok * stride, mask=ok, other=1.0).to(tl.float32)
    if CLAMP:
        v = tl.maximum(v, EPS, propagate_nan=tl.PropagateNan.ALL)
    return _div(tl.full(v.shape, 1.0, tl.float32), v)


@triton.jit
def _inverse_max(row_ptr, stride, a_tok, b_tok, a_ok, b_ok, CLAMP: tl.constexpr):
    """The max of ``_inverse`` over all T tokens (NaN if any is NaN, like amax)."""
    ma = _nan_max(_inverse(row_ptr, stride, a_tok, a_ok, CLAMP), a_ok)
    mb = _nan_max(_inverse(row_ptr, stride, b_tok, b_ok, CLAMP), b_ok)
    return tl.where(ma != ma, ma, tl.where(mb != mb, mb, tl.maximum(ma, mb)))


@triton.jit
def _remap_prefix(slot, dest, num_protected, BLOCK_P: tl.constexpr):
    """Protected-first order: prefix token k takes slot k, other slots keep their
    order after them (new = num_protected + slot - #prefix slots below). dest holds
    every token's raw slot."""
    prefix_k = tl.full(slot.shape, -1, dtype=tl.int32)
    n_below = tl.zeros(slot.shape, dtype=tl.int32)
    for p0 in range(0, num_protected, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < num_protected
        p_slot = tl.load(dest + p, mask=p_ok, other=0).to(tl.int32)
        hit = p_ok[None, :] & (p_slot[None, :] == slot[:, None])
        prefix_k = tl.maximum(prefix_k, tl.max(tl.where(hit, p[None, :], -1), axis=1))
        n_below += tl.sum((p_ok[None, :] & (p_slot[None, :] < slot[:, None])).to(tl.int32), axis=1)
    return tl.where(prefix_k >= 0, prefix_k, num_protected + slot - n_below)


@triton.jit
def _slot_index(dest, order, starts, T, T_out, BLOCK_T: tl.constexpr):
    """The slot index of one image's finished map (BLOCK_T >= T tokens), equal to
    ``slot_index_reference``: ``order`` is the tokens sorted by (slot, token index), a
    sort of the unique keys slot * BLOCK_T + t in registers; ``starts[o]`` = #{t :
    dest[t] < o}, the exclusive prefix sum of the slots' histogram. The matcher's slots
    are all in [0, T'), so every token is in a slot. No loop: on sm_90 it adds 210-540
    instructions to the matcher (static SASS, no loop; ~500 at T = 197), where counting
    pairs in 64 x 32 tiles was estimated at ~6,000 per warp (the static report) and the
    separate slot-index kernel at 7 four-warp programs of ~1,700 per image."""
    t = tl.arange(0, BLOCK_T)
    ok = t < T
    d = tl.load(dest + t, mask=ok, other=0).to(tl.int32)
    key = tl.sort(tl.where(ok, d * BLOCK_T + t, 2147483647))  # padding sorts last
    tl.store(order + t, (key % BLOCK_T).to(tl.int64), mask=ok)
    count = tl.histogram(d, BLOCK_T, mask=ok)
    tl.store(starts + t, (tl.cumsum(count, 0) - count).to(tl.int64), mask=t <= T_out)


@triton.jit
def _match_fused_kernel(
    x_ptr, attn_ptr, size_ptr, scores_ptr, keys_ptr, aux_ptr, dest_ptr, order_ptr, starts_ptr,
    T, t1, t2, C, r1, r2, num_protected,
    stride_xb, stride_xt, stride_xc, stride_ab, stride_at, stride_sb, stride_st,
    e_sim, e_info, e_size,
    SIM_MODE: tl.constexpr, INFO_MODE: tl.constexpr, SIZE_MODE: tl.constexpr,
    HAS_PROT: tl.constexpr, BIDIR: tl.constexpr, REMAP: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr, HALF: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr,
    WITH_SLOTS: tl.constexpr,
):
    """The whole match of one image (t1 <= BLOCK_A, t2 <= BLOCK_B), one program.

    Each score is computed once, BLOCK_M rows at a time, and kept in this image's
    (t1, t2) fp32 scratch (``scores_ptr``: 38 KB at T = 197, L2 resident) for the
    column pass; a whole 128 x 128 tile in registers spills. O(T) scratch: ``keys``
    (node_max at [0, t1), node_max2 at [t1, T)) and ``aux`` (2, t1) int32 (best B of
    each A row; unmerged position or -1 for a source). ``dest`` holds raw B slots
    before the final slots are written. Every write read by other threads of the
    program is followed by ``tl.debug_barrier()``.

    WITH_SLOTS: also the slot index of the finished map (``_slot_index``): ``order``
    (T,) and ``starts`` (T'+1,) of this image, so no separate slot-index launch.
    """
    pid = tl.program_id(0).to(tl.int64)
    a_all = tl.arange(0, BLOCK_A)
    b_idx = tl.arange(0, BLOCK_B)
    a_all_ok = a_all < t1
    b_ok = b_idx < t2
    a_all_tok = (2 * a_all).to(tl.int64)
    b_tok = (2 * b_idx + 1).to(tl.int64)
    x_img = x_ptr + pid * stride_xb
    scores = scores_ptr + pid * t1 * t2
    keys = keys_ptr + pid * T
    aux = aux_ptr + pid * 2 * t1
    dest = dest_ptr + pid * T

    # -- per-token terms of the B side (columns) and the whole-image maxima
    if SIM_MODE != 0:
        x_b = x_img + b_tok[None, :] * stride_xt
        sq_b = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            xb = tl.load(x_b + c[:, None] * stride_xc, mask=b_ok[None, :] & (c[:, None] < C), other=0.0).to(tl.float32)
            sq_b += tl.sum(xb * xb, axis=0)
        n_b = tl.maximum(tl.sqrt_rn(sq_b), EPS, propagate_nan=tl.PropagateNan.ALL)
    attn_row = attn_ptr + pid * stride_ab
    size_row = size_ptr + pid * stride_sb
    if INFO_MODE != 0:
        max_info = _inverse_max(attn_row, stride_at, a_all_tok, b_tok, a_all_ok, b_ok, True)
        i_b = _div(_inverse(attn_row, stride_at, b_tok, b_ok, True), max_info)
    else:
        max_info = 1.0
        i_b = tl.full((BLOCK_B,), 1.0, dtype=tl.float32)
    if SIZE_MODE != 0:
        max_size = _inverse_max(size_row, stride_st, a_all_tok, b_tok, a_all_ok, b_ok, False)
        z_b = _div(_inverse(size_row, stride_st, b_tok, b_ok, False), max_size)
    else:
        max_size = 1.0
        z_b = tl.full((BLOCK_B,), 1.0, dtype=tl.float32)

    # -- stage 1, BLOCK_M rows at a time: scores (once), best B of every A row
    for m0 in range(0, t1, BLOCK_M):
        a_idx = m0 + tl.arange(0, BLOCK_M)
        a_ok = a_idx < t1
        a_tok = (2 * a_idx).to(tl.int64)
        if SIM_MODE != 0:
            x_a = x_img + a_tok[:, None] * stride_xt
            sq_a = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                xa = tl.load(x_a + c[None, :] * stride_xc, mask=a_ok[:, None] & (c[None, :] < C), other=0.0).to(tl.float32)
                sq_a += tl.sum(xa * xa, axis=1)
            n_a = tl.maximum(tl.sqrt_rn(sq_a), EPS, propagate_nan=tl.PropagateNan.ALL)
            acc = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                xa = tl.load(x_a + c[None, :] * stride_xc, mask=a_ok[:, None] & (c[None, :] < C), other=0.0).to(tl.float32)
                xb = tl.load(x_b + c[:, None] * stride_xc, mask=b_ok[None, :] & (c[:, None] < C), other=0.0).to(tl.float32)
                acc = _dot(_normalised(xa, n_a[:, None], HALF, DOT_DTYPE),
                           _normalised(xb, n_b[None, :], HALF, DOT_DTYPE), acc, HALF)
            s = _sim_from_dot(acc, e_sim, SIM_MODE, USE_LIBDEVICE, HALF, DOT_DTYPE)
        else:
            s = tl.full((BLOCK_M, BLOCK_B), 1.0, dtype=tl.float32)
        if INFO_MODE != 0:
            i_a = _div(_inverse(attn_row, stride_at, a_tok, a_ok, True), max_info)
        else:
            i_a = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
        if SIZE_MODE != 0:
            z_a = _div(_inverse(size_row, stride_st, a_tok, a_ok, False), max_size)
        else:
            z_a = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
        s = _finish_scores(s, a_idx, b_idx, a_ok, b_ok, num_protected, i_a, i_b, z_a, z_b, e_info, e_size,
                           INFO_MODE, SIZE_MODE, HAS_PROT, USE_LIBDEVICE)
        if BIDIR:
            tl.store(scores + a_idx[:, None] * t2 + b_idx[None, :], s, mask=a_ok[:, None] & b_ok[None, :])
        tl.store(keys + a_idx, tl.max(s, axis=1), mask=a_ok)
        tl.store(aux + a_idx, tl.argmax(s, axis=1, tie_break_left=True).to(tl.int32), mask=a_ok)
    tl.debug_barrier()  # keys, aux and scores were written by other threads

    # -- rank of A (stable, descending); unmerged position or -1 for a source
    node_max = tl.load(keys + a_all, mask=a_all_ok, other=float("-inf"))
    rank_a = _rank_of(node_max, a_all, keys, t1, BLOCK_J)
    unm = a_all_ok & (rank_a >= r1)
    n_unm = t1 - r1
    if HAS_PROT:
        # Unmerged A tokens are re-sorted by index: position = #unmerged before it.
        unm_i = unm.to(tl.int32)
        pos = tl.cumsum(unm_i, axis=0) - unm_i
    else:
        pos = rank_a - r1  # unmerged tokens stay in descending-score order
    tl.store(aux + t1 + a_all, tl.where(unm, pos, -1), mask=a_all_ok)
    tl.debug_barrier()

    # -- stage 2: best unmerged A of every B column (lowest position on ties), rank of B
    if BIDIR:
        best = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
        best_pos = tl.full((BLOCK_B,), BIG_POS, dtype=tl.int32)
        for m0 in range(0, t1, BLOCK_M):
            a_idx = m0 + tl.arange(0, BLOCK_M)
            a_ok = a_idx < t1
            pos_m = tl.load(aux + t1 + a_idx, mask=a_ok, other=-1)
            unm_m = pos_m >= 0
            s = tl.load(scores + a_idx[:, None] * t2 + b_idx[None, :],
                        mask=unm_m[:, None] & b_ok[None, :], other=float("-inf"))
            tile_max = tl.max(s, axis=0)
            # By position, not only by -inf: a column that is -inf on every unmerged
            # row still picks the first unmerged position (never a source).
            cand = tl.where(unm_m[:, None] & (s == tile_max[None, :]), pos_m[:, None], BIG_POS)
            tile_pos = tl.min(cand, axis=0)
            tie = tile_max == best
            best_pos = tl.where(tile_max > best, tile_pos, tl.where(tie, tl.minimum(best_pos, tile_pos), best_pos))
            best = tl.maximum(best, tile_max)
        to_a = tl.minimum(best_pos, n_unm - 1)  # BIG_POS is unreachable: n_unm >= 1
        tl.store(keys + t1 + b_idx, best, mask=b_ok)
        tl.debug_barrier()
        rank_b = _rank_of(best, b_idx, keys + t1, t2, BLOCK_J)
        # First r2 B tokens merge into their unmerged A token (slot = its position);
        # the rest follow the unmerged A tokens in stage-2 order.
        slot_b = tl.where(rank_b < r2, to_a, n_unm + rank_b - r2)
    else:
        slot_b = n_unm + b_idx

    # -- slots: a source takes its B token's slot, gathered through dest
    tl.store(dest + b_tok, slot_b.to(tl.int64), mask=b_ok)
    tl.debug_barrier()
    src = a_all_ok & (rank_a < r1)
    node_idx = tl.load(aux + a_all, mask=src, other=0)
    via_b = tl.load(dest + 2 * node_idx.to(tl.int64) + 1, mask=src, other=0).to(tl.int32)
    slot_a = tl.where(src, via_b, pos)
    if REMAP:
        tl.store(dest + a_all_tok, slot_a.to(tl.int64), mask=a_all_ok)
        tl.debug_barrier()
        new_a = _remap_prefix(slot_a, dest, num_protected, BLOCK_P)
        new_b = _remap_prefix(slot_b, dest, num_protected, BLOCK_P)
        tl.debug_barrier()  # every raw slot is read before any is overwritten
        tl.store(dest + a_all_tok, new_a.to(tl.int64), mask=a_all_ok)
        tl.store(dest + b_tok, new_b.to(tl.int64), mask=b_ok)
    else:
        tl.store(dest + a_all_tok, slot_a.to(tl.int64), mask=a_all_ok)
    if WITH_SLOTS:
        tl.debug_barrier()  # the final map, written by other threads, is read back whole
        _slot_index(dest, order_ptr + pid * T, starts_ptr + pid * (T - r1 - r2 + 1), T, T - r1 - r2,
                    2 * BLOCK_A)  # T = t1 + t2 <= 2 * BLOCK_A
