"""Triton kernel of the slot merge's backward (docs/algorithm.md, "Pooling"): d x' / d x.

The merge is x'_o = sum_{t in S(o)} w_t x_t / W_o, with the pooling weights w taken as
constants (the reference computes them under no_grad), so its adjoint is a gather:
grad_x[t] = grad[dest t] * w_t / W_{dest t}. A slot whose weights sum to exactly 0
(``den`` == 0, the forward kernel's own sums) has w_t = 1 and W = its member count, as
in the forward. Max pooling (mode 2) gives each member equal to its slot's maximum an
equal share of the slot's gradient (torch's ``amax`` rule): the kernel counts the ties
by walking the slot's members (slot index ``order`` / ``starts``). Tokens whose slot is
outside [0, T') are in no slot: gradient 0.

One program per block of BLOCK_T tokens of one (image, head) row, all channels (or a
SPLIT_C-th of them when the grid is small): every gradient element is written exactly
once, no atomics, no zero fill.
"""
import triton
import triton.language as tl

from ._merge_kernel import _row_size_max, _size_and_weight


@triton.jit
def _merge_backward_kernel(
    g_ptr, stride_gb, stride_gh, stride_gt, stride_gc,  # grad of x' (B, [H,] T', C)
    x_ptr, stride_xb, stride_xh, stride_xt, stride_xc,  # x: mode 2 only
    out_ptr, stride_ob, stride_oh, stride_ot, stride_oc,  # x': mode 2 only
    dest_ptr, stride_db, stride_dt,
    order_ptr, starts_ptr,  # slot index of dest: contiguous (B, T) and (B, T'+1)
    den_ptr,  # (B, T') float32 (float64 for float64 x), contiguous: the forward's slot sums of the weights (modes 0, 1, 3)
    size_ptr, stride_sb, stride_st,
    attn_ptr, stride_ab, stride_at,
    gx_ptr, stride_yb, stride_yh, stride_yt,  # grad of x (B, [H,] T, C); channel stride 1
    H, T, T_out, C,
    MODE: tl.constexpr,  # 0 size, 1 attention*size, 2 max, 3 mean
    HAS_SIZE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,  # float32, or float64 for float64 x
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_C: tl.constexpr,  # channels per step
    BLOCK_R: tl.constexpr,  # sizes per step of the row maximum (mode 1)
    SPLIT_C: tl.constexpr,  # programs sharing one token block's channels
):
    n_blocks = tl.cdiv(T, BLOCK_T)
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row = pid // n_blocks
    b = row // H
    h = row % H
    offs_t = (pid % n_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    d = tl.load(dest_ptr + b * stride_db + offs_t * stride_dt, mask=mask_t, other=-1)
    valid = mask_t & (d >= 0) & (d < T_out)
    d = tl.where(valid, d, 0)
    starts_row = starts_ptr + b * (T_out + 1)
    # Clamped as the forward clamps them: a caller's slot index is not checked (a host sync).
    start = tl.minimum(tl.maximum(tl.load(starts_row + d, mask=valid, other=0), 0), T)
    count = tl.minimum(tl.maximum(tl.load(starts_row + d + 1, mask=valid, other=0), start), T) - start
    count = tl.where(valid, count, 0)

    g_row = g_ptr + b * stride_gb + h * stride_gh + d[:, None] * stride_gt
    gx_row = gx_ptr + b * stride_yb + h * stride_yh + offs_t[:, None] * stride_yt
    if MODE == 2:
        x_row = x_ptr + b * stride_xb + h * stride_xh
        o_row = out_ptr + b * stride_ob + h * stride_oh + d[:, None] * stride_ot
        members = order_ptr + b * T + start
        steps = tl.max(count, axis=0)  # members of the block's largest slot
        for c0 in range(split * BLOCK_C, C, SPLIT_C * BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            m2 = valid[:, None] & (offs_c[None, :] < C)
            top = tl.load(o_row + offs_c[None, :] * stride_oc, mask=m2, other=0.0)
            mine = tl.load(x_row + offs_t[:, None] * stride_xt + offs_c[None, :] * stride_xc, mask=m2, other=0.0)
            ties = tl.zeros([BLOCK_T, BLOCK_C], tl.int32)
            for k in range(0, steps):
                live = k < count
                m = tl.minimum(tl.maximum(tl.load(members + k, mask=live, other=0), 0), T - 1)
                xv = tl.load(x_row + m[:, None] * stride_xt + offs_c[None, :] * stride_xc,
                             mask=live[:, None] & m2, other=0.0)
                ties += (live[:, None] & (xv == top)).to(tl.int32)
            g = tl.load(g_row + offs_c[None, :] * stride_gc, mask=m2, other=0.0).to(ACC_DTYPE)
            is_max = m2 & (mine == top)
            grad = tl.where(is_max, g / tl.maximum(ties, 1).to(ACC_DTYPE), 0.0)
            # a NaN maximum ties with no member: torch's amax backward then gives every member
            # NaN (0 * g / 0), and so do we, as the reference does
            grad = tl.where(m2 & (top != top), float("nan"), grad)
            tl.store(gx_row + offs_c[None, :], grad.to(gx_ptr.dtype.element_ty), mask=(offs_t < T)[:, None]
                     & (offs_c[None, :] < C))
    else:
        smax = _row_size_max(size_ptr + b * stride_sb, stride_st, T, MODE, HAS_SIZE, BLOCK_R)
        _s, w = _size_and_weight(size_ptr + b * stride_sb, stride_st, attn_ptr + b * stride_ab, stride_at,
                                 offs_t, valid, smax, MODE, HAS_SIZE)
        den = tl.load(den_ptr + b * T_out + d, mask=valid, other=1.0)
        unweighted = den == 0
        w = tl.where(unweighted, 1.0, w).to(ACC_DTYPE)
        den = tl.where(unweighted, tl.maximum(count, 1).to(tl.float32), den).to(ACC_DTYPE)
        f = tl.where(valid, w / den, 0.0)  # the token's share of its slot's gradient
        for c0 in range(split * BLOCK_C, C, SPLIT_C * BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            g = tl.load(g_row + offs_c[None, :] * stride_gc, mask=valid[:, None] & mask_c[None, :],
                        other=0.0).to(ACC_DTYPE)
            tl.store(gx_row + offs_c[None, :], (g * f[:, None]).to(gx_ptr.dtype.element_ty),
                     mask=mask_t[:, None] & mask_c[None, :])
