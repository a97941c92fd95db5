"""Triton kernel of the slot merge: a gather-reduce over each slot's members.

``order`` / ``starts`` (the slot index, ``slots.py``) list each slot's members in
ascending token order. One program owns BLOCK_S consecutive slots of one row of
the leading dims and walks their members in that fixed order, BLOCK_C channels
at a time (all channels, or a SPLIT_C-th of them when the grid is small): no
atomics, so every run is bit-identical. The per-slot scalars (new sizes, weight
sums), the pooling weights, the row's size maximum and the sources are computed
in the same launch, and optionally two epilogues on the pooled rows: a residual add
(``residual + scale * x'``, rounded step by step as the eager ops would) and a LayerNorm of
the stored result, written per slot or at every member token's position.
"""
import triton
import triton.language as tl

EPS = tl.constexpr(1e-12)  # floor of the mode-1 size normaliser, as mctf_kernels.merge.EPS


@triton.jit
def _row_size_max(size_row, stride_st, T, MODE: tl.constexpr, HAS_SIZE: tl.constexpr, BLOCK_R: tl.constexpr):
    """The row's largest size for mode 1's weights (``pooling_weights``' max; 1.0 otherwise), for
    the merge and both backwards alike. Floored at EPS (all-zero sizes do not give 0/0); NaN is
    skipped (it would take every weight of the row to NaN, not just its slot's)."""
    smax = 1.0
    if MODE == 1 and HAS_SIZE:
        run = tl.full([BLOCK_R], EPS, tl.float32)
        for r0 in range(0, T, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            sv = tl.load(size_row + offs_r * stride_st, mask=offs_r < T, other=EPS).to(tl.float32)
            run = tl.where(sv > run, sv, run)
        smax = tl.max(run, axis=0)
    return smax


@triton.jit
def _member(members, k, count, T):
    """The k-th member token of each slot (``valid``: the slot has one), clamped to [0, T):
    a caller's unchecked slot index gives wrong numbers, never a read outside the tensors."""
    valid = k < count
    return valid, tl.minimum(tl.maximum(tl.load(members + k, mask=valid, other=0), 0), T - 1)


@triton.jit
def _size_and_weight(size_row, stride_st, attn_row, stride_at, t, valid, smax,
                     MODE: tl.constexpr, HAS_SIZE: tl.constexpr):
    """Size s and pooling weight w of tokens t (0 where not valid), as pooling_weights."""
    if HAS_SIZE:
        s = tl.load(size_row + t * stride_st, mask=valid, other=0.0).to(tl.float32)
    else:
        s = tl.where(valid, 1.0, 0.0)
    if MODE == 1:
        a = tl.load(attn_row + t * stride_at, mask=valid, other=0.0).to(tl.float32)
        if HAS_SIZE:
            w = a * (s / smax)
        else:
            w = a
    elif MODE == 0:
        w = s
    else:
        w = tl.where(valid, 1.0, 0.0)
    return s, w


@triton.jit
def _rows_mask(rows, offs_c, C, EVEN_C: tl.constexpr):
    """Mask of a (slots, channels) tile: the rows', and the channels' unless C fills the tile."""
    if EVEN_C:
        return rows[:, None]
    else:
        return rows[:, None] & (offs_c < C)[None, :]


@triton.jit
def _load_channels(ptrs, offs_c, C, EVEN_C: tl.constexpr):
    """A per-channel vector (weights, bias, scale): unmasked when C fills the chunks."""
    if EVEN_C:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=offs_c < C, other=0.0)


@triton.jit
def _pooled_rows(acc, den, count, mask_s, x_dtype: tl.constexpr, out_dtype: tl.constexpr,
                 res_ptrs, scale_ptrs, offs_c, C,
                 MODE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_SCALE: tl.constexpr,
                 SCALED_DTYPE: tl.constexpr, EPI_DTYPE: tl.constexpr, EVEN_C: tl.constexpr):
    """The slots' pooled rows from their sums (as stored in out's dtype), with the residual
    epilogue: each rounding of the eager ops, x' in x's dtype, the product in SCALED_DTYPE,
    the sum in out's dtype (half types computed in float32, as torch does)."""
    if MODE == 2:
        acc = tl.where(count[:, None] > 0, acc, float("nan"))  # an empty slot: NaN, like the reference
    else:
        # an empty slot gives 0/0 = NaN, like the reference (padding rows divide by 1)
        acc = acc / tl.where(mask_s, den, 1.0)[:, None]
    if HAS_RESIDUAL:
        x_new = acc.to(x_dtype).to(EPI_DTYPE)
        if HAS_SCALE:
            gamma = _load_channels(scale_ptrs, offs_c, C, EVEN_C).to(EPI_DTYPE)
            x_new = (x_new * gamma[None, :]).to(SCALED_DTYPE).to(EPI_DTYPE)
        res = tl.load(res_ptrs, mask=_rows_mask(mask_s, offs_c, C, EVEN_C), other=0.0).to(EPI_DTYPE)
        x_new = (res + x_new).to(out_dtype)
    else:
        x_new = acc.to(out_dtype)
    return x_new


@triton.jit
def _merge_kernel(
    x_ptr, stride_xb, stride_xh, stride_xt, stride_xc,
    stride_xg,  # GROUP_C > 0: x's channel c lives at (c // GROUP_C) * stride_xg + (c % GROUP_C) * stride_xc
    order_ptr, starts_ptr,  # contiguous (B, T) int64 and (B, T'+1) int64
    size_ptr, stride_sb, stride_st,
    attn_ptr, stride_ab, stride_at,
    src_ptr, stride_nb, stride_nt, stride_nn,
    out_ptr, stride_ob, stride_oh, stride_ot,  # out's channel stride is 1
    new_size_ptr, den_ptr, new_src_ptr,  # contiguous (B, T'), (B, T'), (B, T', N)
    norm_w_ptr, norm_b_ptr, normed_ptr, stride_yb, stride_yt,  # HAS_NORM: LayerNorm(x') (B, T' or T, C), unit last stride
    eps,
    res_ptr, stride_rb, stride_rt, scale_ptr,  # HAS_RESIDUAL: (B, T', C) unit last stride; HAS_SCALE: (C,) contiguous
    H, T, T_out, C, N,
    MODE: tl.constexpr,  # 0 size, 1 attention*size, 2 max, 3 mean
    HAS_SIZE: tl.constexpr,  # False: every size is 1
    HAS_SOURCE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,  # float32, or float64 for float64 x (keeps max exact)
    BLOCK_S: tl.constexpr,  # slots per program
    BLOCK_C: tl.constexpr,  # channels per step
    BLOCK_N: tl.constexpr,  # source columns per step
    BLOCK_T: tl.constexpr,  # sizes per step of the row maximum
    SPLIT_C: tl.constexpr,  # programs sharing one slot block's channels
    GROUP_C: tl.constexpr = 0,  # > 0: channels are groups of GROUP_C (e.g. heads of (B, H, T, D) rows)
    HAS_NORM: tl.constexpr = False,  # also LayerNorm(x'): whole rows, NCHUNK x BLOCK_C >= C channels, SPLIT_C == 1
    NCHUNK: tl.constexpr = 1,  # HAS_NORM: channel chunks per row
    EVEN_C: tl.constexpr = False,  # HAS_NORM: NCHUNK * BLOCK_C == C
    NORM_AT_TOKENS: tl.constexpr = False,  # the LayerNorm's rows go to every member token (B, T, C)
    HAS_RESIDUAL: tl.constexpr = False,  # out = residual + [scale *] x' (3-d x, weighted modes)
    HAS_SCALE: tl.constexpr = False,
    SCALED_DTYPE: tl.constexpr = tl.float32,  # torch's result dtype of scale * x' (rounded to it)
    EPI_DTYPE: tl.constexpr = tl.float32,  # the epilogues' arithmetic: float64 when an operand is
):
    # Axis 0: (row of the leading dims, slot block); rows are (b, h) with h < H, so the
    # same kernel merges tokens (H = 1) and per-head query rows (dest is per b).
    # With the LayerNorm at the tokens, one more slot, T', lists the tokens in no slot (the
    # slot index puts them after the last slot's members, up to T): the program that holds
    # it writes their zero rows in the same member walk as the real slots' rows.
    if NORM_AT_TOKENS:
        n_blocks = tl.cdiv(T_out + 1, BLOCK_S)
    else:
        n_blocks = tl.cdiv(T_out, BLOCK_S)
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row = pid // n_blocks
    b = row // H
    h = row % H
    offs_s = (pid % n_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < T_out  # the real slots: every store of a slot's row or scalars
    bounds = starts_ptr + b * (T_out + 1) + offs_s
    # Clamped: a caller's precomputed slot index (``slots=``) is not checked (a host sync),
    # so wrong values give wrong numbers but never a read outside order, x, size, source.
    if NORM_AT_TOKENS:
        start = tl.minimum(tl.maximum(tl.load(bounds, mask=offs_s <= T_out, other=0), 0), T)
        end = tl.where(offs_s == T_out, T, tl.load(bounds + 1, mask=mask_s, other=0))
    else:
        start = tl.minimum(tl.maximum(tl.load(bounds, mask=mask_s, other=0), 0), T)
        end = tl.load(bounds + 1, mask=mask_s, other=0)
    count = tl.minimum(tl.maximum(end, start), T) - start
    steps = tl.max(count, axis=0)  # members of the block's largest slot
    members = order_ptr + b * T + start
    size_row = size_ptr + b * stride_sb
    attn_row = attn_ptr + b * stride_ab

    smax = _row_size_max(size_row, stride_st, T, MODE, HAS_SIZE, BLOCK_T)  # pooling_weights' max, folded in

    # Per-slot sums of sizes and pooling weights (same expressions as pooling_weights).
    s_sum = tl.zeros([BLOCK_S], tl.float32)
    w_sum = tl.zeros([BLOCK_S], ACC_DTYPE)  # float64 for float64 x, as the reference's sum
    for k in range(0, steps):
        valid, t = _member(members, k, count, T)
        s, w = _size_and_weight(size_row, stride_st, attn_row, stride_at, t, valid, smax, MODE, HAS_SIZE)
        s_sum += s
        w_sum += w

    # A slot whose weights sum to exactly 0 is its members' unweighted mean (weight 1 each).
    unweighted = w_sum == 0
    den = tl.where(unweighted, count.to(ACC_DTYPE), w_sum)
    # w * keep + unw: exactly w, or 1 (the weights of a slot summing to 0 are finite);
    # arithmetic, not a select in the loop below, where a select costs a register spill
    unw = unweighted.to(tl.float32)
    keep = 1.0 - unw

    x_row = x_ptr + b * stride_xb + h * stride_xh
    out_row = out_ptr + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_ot
    res_row = res_ptr + b * stride_rb + offs_s[:, None] * stride_rt
    if HAS_NORM:
        # Whole rows: NCHUNK chunks of BLOCK_C channels held together (C = 384 is 3 x 128: no
        # padded lanes; EVEN_C: no channel masks), each pooled exactly as the loop below pools it.
        accs = ()
        for j in tl.static_range(NCHUNK):
            if MODE == 2:
                accs = accs + (tl.full([BLOCK_S, BLOCK_C], float("-inf"), ACC_DTYPE),)
            else:
                accs = accs + (tl.zeros([BLOCK_S, BLOCK_C], ACC_DTYPE),)
        for k in range(0, steps):
            valid, t = _member(members, k, count, T)
            if MODE != 2:
                _s, w = _size_and_weight(size_row, stride_st, attn_row, stride_at, t, valid, smax, MODE, HAS_SIZE)
                w = w * keep + unw
            new = ()
            for j in tl.static_range(NCHUNK):
                offs_c = j * BLOCK_C + tl.arange(0, BLOCK_C)
                xv = tl.load(x_row + t[:, None] * stride_xt + offs_c[None, :] * stride_xc,
                             mask=_rows_mask(valid, offs_c, C, EVEN_C), other=0.0).to(ACC_DTYPE)
                if MODE == 2:
                    a = tl.where(valid[:, None], tl.maximum(accs[j], xv, propagate_nan=tl.PropagateNan.ALL), accs[j])
                else:
                    a = accs[j] + xv * w[:, None]
                new = new + (a,)
            accs = new
        # The stored rows, then LayerNorm of them as stored (rounded to out's dtype), in
        # EPI_DTYPE, two-pass (mean, then centred variance) like torch's.
        rows = ()
        total = tl.zeros([BLOCK_S], EPI_DTYPE)
        for j in tl.static_range(NCHUNK):
            offs_c = j * BLOCK_C + tl.arange(0, BLOCK_C)
            x_new = _pooled_rows(accs[j], den, count, mask_s, x_ptr.dtype.element_ty, out_ptr.dtype.element_ty,
                                 res_row + offs_c[None, :], scale_ptr + offs_c, offs_c, C,
                                 MODE, HAS_RESIDUAL, HAS_SCALE, SCALED_DTYPE, EPI_DTYPE, EVEN_C)
            tl.store(out_row + offs_c[None, :], x_new, mask=_rows_mask(mask_s, offs_c, C, EVEN_C))
            xr = x_new.to(EPI_DTYPE)
            if not EVEN_C:
                xr = tl.where((offs_c < C)[None, :], xr, 0.0)
            total += tl.sum(xr, axis=1)
            rows = rows + (xr,)
        mean = total / C
        sq = tl.zeros([BLOCK_S], EPI_DTYPE)
        centred = ()
        for j in tl.static_range(NCHUNK):
            offs_c = j * BLOCK_C + tl.arange(0, BLOCK_C)
            xc = rows[j] - mean[:, None]
            if not EVEN_C:
                xc = tl.where((offs_c < C)[None, :], xc, 0.0)
            sq += tl.sum(xc * xc, axis=1)
            centred = centred + (xc,)
        var = sq / C + eps
        if EPI_DTYPE == tl.float64:
            rstd = 1.0 / tl.sqrt(var)  # IEEE in float64
        else:
            rstd = 1.0 / tl.sqrt_rn(var)  # IEEE, not the approximate square root
        normed = ()
        for j in tl.static_range(NCHUNK):
            offs_c = j * BLOCK_C + tl.arange(0, BLOCK_C)
            nw = _load_channels(norm_w_ptr + offs_c, offs_c, C, EVEN_C).to(EPI_DTYPE)
            nb = _load_channels(norm_b_ptr + offs_c, offs_c, C, EVEN_C).to(EPI_DTYPE)
            y = (centred[j] * rstd[:, None] * nw[None, :] + nb[None, :]).to(normed_ptr.dtype.element_ty)
            if NORM_AT_TOKENS:
                y = tl.where(mask_s[:, None], y, 0.0)  # slot T' (tokens in no slot): zeros
            normed = normed + (y,)
        normed_row = normed_ptr + b * stride_yb
        if NORM_AT_TOKENS:
            # Every member token gets its slot's row: slots own disjoint members, so each
            # position is written once, by the program that walked it above.
            for k in range(0, steps):
                valid, t = _member(members, k, count, T)
                for j in tl.static_range(NCHUNK):
                    offs_c = j * BLOCK_C + tl.arange(0, BLOCK_C)
                    tl.store(normed_row + t[:, None] * stride_yt + offs_c[None, :], normed[j],
                             mask=_rows_mask(valid, offs_c, C, EVEN_C))
        else:
            for j in tl.static_range(NCHUNK):
                offs_c = j * BLOCK_C + tl.arange(0, BLOCK_C)
                tl.store(normed_row + offs_s[:, None] * stride_yt + offs_c[None, :], normed[j],
                         mask=_rows_mask(mask_s, offs_c, C, EVEN_C))
    else:
        for c0 in range(split * BLOCK_C, C, SPLIT_C * BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            if GROUP_C > 0:  # x's channels in groups, out's contiguous: one program covers every head
                x_c = (offs_c // GROUP_C) * stride_xg + (offs_c % GROUP_C) * stride_xc
            else:
                x_c = offs_c * stride_xc
            if MODE == 2:
                acc = tl.full([BLOCK_S, BLOCK_C], float("-inf"), ACC_DTYPE)
            else:
                acc = tl.zeros([BLOCK_S, BLOCK_C], ACC_DTYPE)
            for k in range(0, steps):
                valid, t = _member(members, k, count, T)
                xv = tl.load(x_row + t[:, None] * stride_xt + x_c[None, :],
                             mask=valid[:, None] & mask_c[None, :], other=0.0).to(ACC_DTYPE)
                if MODE == 2:
                    # torch's amax propagates NaN; so do we.
                    acc = tl.where(valid[:, None], tl.maximum(acc, xv, propagate_nan=tl.PropagateNan.ALL), acc)
                else:
                    _s, w = _size_and_weight(size_row, stride_st, attn_row, stride_at, t, valid, smax, MODE,
                                             HAS_SIZE)
                    w = w * keep + unw  # xv is 0 where not valid
                    acc += xv * w[:, None]
            x_new = _pooled_rows(acc, den, count, mask_s, x_ptr.dtype.element_ty, out_ptr.dtype.element_ty,
                                 res_row + offs_c[None, :], scale_ptr + offs_c, offs_c, C,
                                 MODE, HAS_RESIDUAL, HAS_SCALE, SCALED_DTYPE, EPI_DTYPE, False)
            tl.store(out_row + offs_c[None, :], x_new, mask=mask_s[:, None] & mask_c[None, :])

    # Per-slot results depend on b only: the programs of head 0, first channel split.
    if (h == 0) & (split == 0):
        tl.store(new_size_ptr + b * T_out + offs_s, s_sum, mask=mask_s)
        if MODE != 2:
            tl.store(den_ptr + b * T_out + offs_s, w_sum.to(den_ptr.dtype.element_ty), mask=mask_s)
        if HAS_SOURCE:
            src_row = src_ptr + b * stride_nb
            dst_row = new_src_ptr + (b * T_out + offs_s[:, None]) * N
            for n0 in range(0, N, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                mask_n = offs_n < N
                src = tl.full([BLOCK_S, BLOCK_N], float("-inf"), tl.float32)
                for k in range(0, steps):
                    valid, t = _member(members, k, count, T)
                    sv = tl.load(src_row + t[:, None] * stride_nt + offs_n[None, :] * stride_nn,
                                 mask=valid[:, None] & mask_n[None, :], other=float("-inf")).to(tl.float32)
                    src = tl.where(valid[:, None], tl.maximum(src, sv, propagate_nan=tl.PropagateNan.ALL), src)
                src = tl.where(count[:, None] > 0, src, float("nan"))
                tl.store(dst_row + offs_n[None, :], src.to(new_src_ptr.dtype.element_ty), mask=mask_s[:, None] & mask_n[None, :])
