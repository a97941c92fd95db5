"""Triton kernel of the slot merge: a gather-reduce over each slot's members.

The launcher (``merge.py``) sorts the slot map once per batch row, giving a
CSR-like inverse: ``order`` (B, T) lists tokens by slot (ascending token index
inside a slot) and ``starts`` (B, T'+1) the slot boundaries in ``order``. One
program then owns one output slot (of one row of the leading dims) and one
channel block, and walks the slot's members in that fixed order: no atomics,
so every run is bit-identical.
"""
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(
    x_ptr, stride_xb, stride_xh, stride_xt, stride_xc,
    order_ptr, starts_ptr,  # contiguous (B, T) int64 and (B, T'+1) int64
    size_ptr, stride_sb, stride_st,
    attn_ptr, stride_ab, stride_at,
    smax_ptr,  # (B,) float32: per-batch max size, mode 1 only
    src_ptr, stride_nb, stride_nt, stride_nn,
    out_ptr, stride_ob, stride_oh, stride_ot,  # out's channel stride is 1
    new_size_ptr, den_ptr, new_src_ptr,  # contiguous (B, T'), (B, T'), (B, T', N)
    H, T, T_out, C, N,
    MODE: tl.constexpr,  # 0 size, 1 attention*size, 2 max, 3 mean
    HAS_SIZE: tl.constexpr,  # False: every size is 1
    HAS_SOURCE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,  # float32, or float64 for float64 x (keeps max exact)
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Axis 0: (row of the leading dims, slot); rows are (b, h) with h < H, so the
    # same kernel merges tokens (H = 1) and per-head query rows (dest is per b).
    pid = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    slot = pid % T_out
    row = pid // T_out
    b = row // H
    h = row % H

    start = tl.load(starts_ptr + b * (T_out + 1) + slot)
    end = tl.load(starts_ptr + b * (T_out + 1) + slot + 1)

    offs_c = blk * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    x_row = x_ptr + b * stride_xb + h * stride_xh
    if MODE == 2:
        acc = tl.full([BLOCK_C], float("-inf"), ACC_DTYPE)
    else:
        acc = tl.zeros([BLOCK_C], ACC_DTYPE)
    w_sum = tl.zeros([], tl.float32)
    s_sum = tl.zeros([], tl.float32)
    if HAS_SOURCE:
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        src_acc = tl.full([BLOCK_N], float("-inf"), tl.float32)

    for i in range(start, end):
        t = tl.load(order_ptr + b * T + i)
        if HAS_SIZE:
            s = tl.load(size_ptr + b * stride_sb + t * stride_st).to(tl.float32)
        else:
            s = tl.full([], 1.0, tl.float32)
        s_sum += s
        xv = tl.load(x_row + t * stride_xt + offs_c * stride_xc, mask=mask_c, other=0.0).to(ACC_DTYPE)
        if MODE == 2:
            # torch's amax propagates NaN; so do we.
            acc = tl.maximum(acc, xv, propagate_nan=tl.PropagateNan.ALL)
        else:
            if MODE == 0:
                w = s
            elif MODE == 1:
                # Same expression (and rounding) as pooling_weights: a * (s / max s).
                a = tl.load(attn_ptr + b * stride_ab + t * stride_at).to(tl.float32)
                if HAS_SIZE:
                    w = a * (s / tl.load(smax_ptr + b))
                else:
                    w = a
            else:
                w = tl.full([], 1.0, tl.float32)
            acc += xv * w
            w_sum += w
        if HAS_SOURCE:
            sv = tl.load(src_ptr + b * stride_nb + t * stride_nt + offs_n * stride_nn,
                         mask=mask_n, other=float("-inf")).to(tl.float32)
            src_acc = tl.maximum(src_acc, sv, propagate_nan=tl.PropagateNan.ALL)

    if MODE != 2:
        acc = acc / w_sum  # an empty slot gives 0/0 = NaN, like the reference
    out = out_ptr + b * stride_ob + h * stride_oh + slot * stride_ot + offs_c
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_c)

    # Per-slot scalars depend on b only: one program per (b, slot) writes them.
    first = (h == 0) & (blk == 0)
    tl.store(new_size_ptr + b * T_out + slot, s_sum, mask=first)
    if MODE != 2:
        tl.store(den_ptr + b * T_out + slot, w_sum, mask=first)
    if HAS_SOURCE:
        dst = new_src_ptr + (b * T_out + slot) * N + offs_n
        tl.store(dst, src_acc.to(new_src_ptr.dtype.element_ty), mask=mask_n & (h == 0))
