"""Triton kernel of ``fusion_attention`` (docs/algorithm.md, "One-step-ahead attention"),
flash-style: the (B, H, T, T) probabilities are computed tile by tile from q and k
and never written to memory.

``_attention_lse_received_kernel``, one launch: each query's log-sum-exp and the
column sums of P = exp(s - lse). For T <= 256 (every 224 px model) a 64-query
block's whole key row is one on-chip tile: q.k^T is computed once; longer rows take
two loops over key tiles (online max / sum, then P). ``received`` is bit-identical
run to run without float atomics: either one program per image walks its heads and
query blocks in a fixed order and writes ``received`` itself (``PER_IMAGE``: one
launch, used when the batch alone fills the GPU), or one program per (batch, head,
query block) writes partial column sums that the launcher adds in a fixed order.

Given the token sizes (``SIZE_GIVEN``) the kernel takes their log itself: libdevice's
``logf`` on a GPU, float64 ``log`` rounded to float32 under the interpreter (which has no
libdevice); either may differ from ``torch.log`` in the last bit, so ``lse`` and
``received`` then differ from the reference by rounding only. The same launch writes
the output attention's additive mask (``WRITE_MASK``): the per-key bias rounded to the
mask's dtype, each image's row written by exactly one program.

The helpers ``scaled_queries``, ``keys_t`` and ``logits_tile`` are shared with the
backward of the output (``_attention_backward_kernel.py``), so both recompute the same
logits with the same operand rounding; the backward's ``key_bias`` reads the float32
log_size the forward's ``_fwd_key_bias`` computes from a given log_size (the training path
passes log_size, not sizes).
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def scaled_queries(q_row, rows, mask_rows, stride_qt, stride_qd, offs_d, mask_d, scale):
    """q[rows] * scale rounded to q's dtype, as the reference's ``q * scale``: (BLOCK_M, BLOCK_D)."""
    q = tl.load(q_row + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=mask_rows[:, None] & mask_d[None, :], other=0.0)
    return (q.to(tl.float32) * scale).to(q.dtype)


@triton.jit
def keys_t(k_row, offs_k, mask_k, stride_kt, stride_kd, offs_d, mask_d):
    """K^T tile (BLOCK_D, BLOCK_N) of the keys offs_k, in k's dtype."""
    return tl.load(k_row + offs_k[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                   mask=mask_d[:, None] & mask_k[None, :], other=0.0)


@triton.jit
def key_bias(logs_row, offs_k, mask_k, stride_lt, HAS_LOG_SIZE: tl.constexpr):
    """The logits' bias on each key: log_size (proportional attention) or 0; -inf past T."""
    if HAS_LOG_SIZE:
        bias = tl.load(logs_row + offs_k * stride_lt, mask=mask_k, other=0.0).to(tl.float32)
    else:
        bias = 0.0
    return tl.where(mask_k, bias, float("-inf"))


@triton.jit
def _bias_of(sizes_row, offs_k, mask_k, stride_lt, SIZE_GIVEN: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """The float32 bias per key from what the launcher passed: log_size as it is, or the
    log of the sizes (masked keys read size 1: a finite log, replaced by the caller)."""
    v = tl.load(sizes_row + offs_k * stride_lt, mask=mask_k, other=1.0).to(tl.float32)
    if SIZE_GIVEN:
        if USE_LIBDEVICE:
            v = libdevice.log(v)
        else:  # the interpreter has no libdevice
            v = tl.log(v.to(tl.float64)).to(tl.float32)
    return v


@triton.jit
def _fwd_key_bias(sizes_row, offs_k, mask_k, stride_lt, mask_row, write,
                  HAS_LOG_SIZE: tl.constexpr, SIZE_GIVEN: tl.constexpr, STORE: tl.constexpr,
                  USE_LIBDEVICE: tl.constexpr):
    """``key_bias`` of the forward: the bias from sizes or log sizes; with ``STORE`` also
    writes it, rounded to the mask's dtype, where ``write`` (one program per image)."""
    if HAS_LOG_SIZE:
        bias = _bias_of(sizes_row, offs_k, mask_k, stride_lt, SIZE_GIVEN, USE_LIBDEVICE)
        if STORE:
            tl.store(mask_row + offs_k, bias.to(mask_row.dtype.element_ty), mask=mask_k & write)
    else:
        bias = 0.0
    return tl.where(mask_k, bias, float("-inf"))


@triton.jit
def logits_tile(qs, kt, bias, QK_PRECISION: tl.constexpr):
    """s = qs @ K^T + bias in float32 (fp32 accumulation): (BLOCK_M, BLOCK_N)."""
    return tl.dot(qs, kt, input_precision=QK_PRECISION).to(tl.float32) + bias[None, :]


@triton.jit
def _one_tile_block(qs, kt, bias, mask_m, QK_PRECISION: tl.constexpr):
    """One query block against the whole key row: each query's lse and the column sums
    of P over the block's queries (padding query rows, past T, hold finite logits and
    are zeroed)."""
    s = logits_tile(qs, kt, bias, QK_PRECISION)
    m_i = tl.max(s, axis=1)
    e = tl.exp(s - m_i[:, None])
    l_i = tl.sum(e, axis=1)
    p = tl.where(mask_m[:, None], e * (1.0 / l_i)[:, None], 0.0)
    return m_i + tl.log(l_i), tl.sum(p, axis=0)


@triton.jit
def _attention_lse_received_kernel(
    q_ptr, stride_qb, stride_qh, stride_qt, stride_qd,
    k_ptr, stride_kb, stride_kh, stride_kt, stride_kd,
    logs_ptr, stride_lb, stride_lt,  # log_size, or the sizes (SIZE_GIVEN), (B, T): HAS_LOG_SIZE only
    lse_ptr,  # (B, H, T) float32, contiguous
    mask_ptr, stride_mb,  # (B, >= T) in q's dtype: the output attention's additive mask, WRITE_MASK only
    part_ptr,  # (B, H, n_query_blocks, T) float32, contiguous: column sums of P * inv_norm;
    # PER_IMAGE: received (B, T) float32, contiguous
    scale,
    inv_norm,  # 1 / (H * T): received is the mean over heads and queries
    H, T, D,
    HAS_LOG_SIZE: tl.constexpr,  # the logits have a bias per key (proportional attention)
    SIZE_GIVEN: tl.constexpr,  # logs_ptr holds the sizes: the kernel takes their log
    WRITE_MASK: tl.constexpr,  # also write the bias in mask_ptr's dtype (HAS_LOG_SIZE only)
    USE_LIBDEVICE: tl.constexpr,  # libdevice's logf (GPU); the interpreter has none
    QK_PRECISION: tl.constexpr,  # "ieee" or "tf32" for float32 q, k (as torch's matmul setting)
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per tile (>= T when ONE_TILE)
    BLOCK_D: tl.constexpr,
    ONE_TILE: tl.constexpr,  # the whole key row in one tile: q.k^T once
    PER_IMAGE: tl.constexpr,  # ONE_TILE only: one program per image writes received itself
):
    if PER_IMAGE:
        # Heads, then query blocks, in a fixed order: received is the same sum every run.
        # Each head's keys are loaded once for all its query blocks.
        b = tl.program_id(0).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_N)
        mask_k = offs_k < T
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        if WRITE_MASK:  # before the loop: nothing of it stays live through the loop
            _fwd_key_bias(logs_ptr + b * stride_lb, offs_k, mask_k, stride_lt, mask_ptr + b * stride_mb, True,
                          HAS_LOG_SIZE, SIZE_GIVEN, True, USE_LIBDEVICE)
        t_end = T  # always T (m0 < T); loop-carried so the compiler rebuilds the key mask per step
        for h in range(0, H):
            kt = keys_t(k_ptr + b * stride_kb + h * stride_kh, offs_k, mask_k, stride_kt, stride_kd, offs_d, mask_d)
            q_row = q_ptr + b * stride_qb + h * stride_qh
            for m0 in range(0, T, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                mask_m = offs_m < T
                qs = scaled_queries(q_row, offs_m, mask_m, stride_qt, stride_qd, offs_d, mask_d, scale)
                # Per-key vectors are rebuilt each step, not kept across it (their pointers
                # and bias would hold ~100 registers through the loop: spills at 128).
                t_end = tl.maximum(t_end, m0 + 1)
                bias = _fwd_key_bias(logs_ptr + b * stride_lb, offs_k, offs_k < t_end, stride_lt, mask_ptr, False,
                                     HAS_LOG_SIZE, SIZE_GIVEN, False, USE_LIBDEVICE)
                recv_row = part_ptr + b * T + offs_k
                lse, colsum = _one_tile_block(qs, kt, bias, mask_m, QK_PRECISION)
                # The running sum lives in received itself, not in registers (a register
                # accumulator across the loop doubles the registers: 1 CTA/SM). The load
                # and the store may map an element to different threads: the barrier makes
                # the previous step's stores visible to the whole CTA first.
                if h + m0 > 0:
                    tl.debug_barrier()
                    colsum += tl.load(recv_row, mask=mask_k, other=0.0)
                tl.store(recv_row, colsum, mask=mask_k)
                tl.store(lse_ptr + (b * H + h) * T + offs_m, lse, mask=mask_m)
        recv_row = part_ptr + b * T + offs_k
        tl.debug_barrier()
        tl.store(recv_row, tl.load(recv_row, mask=mask_k, other=0.0) * inv_norm, mask=mask_k)
    else:
        bh = tl.program_id(0).to(tl.int64)
        mb = tl.program_id(1).to(tl.int64)
        n_mb = tl.num_programs(1)
        b = bh // H
        h = bh % H
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < T
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        k_row = k_ptr + b * stride_kb + h * stride_kh
        logs_row = logs_ptr + b * stride_lb
        part_row = part_ptr + (bh * n_mb + mb) * T
        mask_row = mask_ptr + b * stride_mb
        writer = (h == 0) & (mb == 0)  # the one program per image that writes the mask
        qs = scaled_queries(q_ptr + b * stride_qb + h * stride_qh, offs_m, mask_m, stride_qt, stride_qd,
                            offs_d, mask_d, scale)

        if ONE_TILE:
            offs_k = tl.arange(0, BLOCK_N)
            mask_k = offs_k < T
            kt = keys_t(k_row, offs_k, mask_k, stride_kt, stride_kd, offs_d, mask_d)
            bias = _fwd_key_bias(logs_row, offs_k, mask_k, stride_lt, mask_row, writer,
                                 HAS_LOG_SIZE, SIZE_GIVEN, WRITE_MASK, USE_LIBDEVICE)
            lse, colsum = _one_tile_block(qs, kt, bias, mask_m, QK_PRECISION)
            tl.store(part_row + offs_k, colsum * inv_norm, mask=mask_k)
        else:
            # Loop 1, online softmax normaliser: m = running max, l = sum exp(s - m). The
            # first key tile holds key 0, so m is finite after one step.
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            for k0 in range(0, T, BLOCK_N):
                offs_k = k0 + tl.arange(0, BLOCK_N)
                mask_k = offs_k < T
                kt = keys_t(k_row, offs_k, mask_k, stride_kt, stride_kd, offs_d, mask_d)
                bias = _fwd_key_bias(logs_row, offs_k, mask_k, stride_lt, mask_row, writer,
                                     HAS_LOG_SIZE, SIZE_GIVEN, WRITE_MASK, USE_LIBDEVICE)
                s = logits_tile(qs, kt, bias, QK_PRECISION)
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
                m_i = m_new
            lse = m_i + tl.log(l_i)
            # Loop 2: P per key tile, summed over this block's queries.
            for k0 in range(0, T, BLOCK_N):
                offs_k = k0 + tl.arange(0, BLOCK_N)
                mask_k = offs_k < T
                kt = keys_t(k_row, offs_k, mask_k, stride_kt, stride_kd, offs_d, mask_d)
                bias = _fwd_key_bias(logs_row, offs_k, mask_k, stride_lt, mask_row, False,
                                     HAS_LOG_SIZE, SIZE_GIVEN, False, USE_LIBDEVICE)
                s = logits_tile(qs, kt, bias, QK_PRECISION)
                p = tl.where(mask_m[:, None], tl.exp(s - lse[:, None]), 0.0)
                tl.store(part_row + offs_k, tl.sum(p, axis=0) * inv_norm, mask=mask_k)
        tl.store(lse_ptr + bh * T + offs_m, lse, mask=mask_m)


@triton.jit
def _gather_values_kernel(
    v_ptr, stride_vb, stride_vh, stride_vt, stride_vd,  # V' (B, H, T', D)
    dest_ptr, stride_db, stride_dt,
    logs_ptr, stride_lb, stride_lt,  # log_size (B, T) float32: HAS_LOG_SIZE only
    out_ptr,  # V'[dest] (B, T, H, D), contiguous: the value operand of the P @ V'[dest] attention
    bias_ptr, stride_bb,  # (B, >= T) in q's dtype: log_size as the attention's additive mask
    H, T, T_out, D,
    HAS_LOG_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_D: tl.constexpr,
):
    """Each key token's slot value V'[dest[t]] for every head (zero when its slot is outside
    [0, T'): such a key adds nothing to any row) and, in the same launch, log_size rounded
    to q's dtype: the two operands the attention over the pre-fusion keys needs."""
    b = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    slot = tl.load(dest_ptr + b * stride_db + offs_t * stride_dt, mask=mask_t, other=-1)
    valid = mask_t & (slot >= 0) & (slot < T_out)
    slot = tl.where(valid, slot, 0)  # every read stays inside V'
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    src = v_ptr + b * stride_vb + slot[:, None] * stride_vt + offs_d[None, :] * stride_vd
    dst = out_ptr + ((b * T + offs_t[:, None]) * H) * D + offs_d[None, :]
    for h in range(0, H):
        vals = tl.load(src + h * stride_vh, mask=valid[:, None] & mask_d[None, :], other=0.0)
        tl.store(dst + h * D, vals, mask=mask_t[:, None] & mask_d[None, :])
    if HAS_LOG_SIZE:
        ls = tl.load(logs_ptr + b * stride_lb + offs_t * stride_lt, mask=mask_t, other=0.0)
        tl.store(bias_ptr + b * stride_bb + offs_t, ls.to(bias_ptr.dtype.element_ty), mask=mask_t)
