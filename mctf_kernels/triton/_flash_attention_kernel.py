"""Triton kernel of ``fusion_attention`` (docs/algorithm.md, "One-step-ahead attention"),
flash-style: the (B, H, T, T) probabilities are computed tile by tile from q and k
and never written to memory.

``_attention_lse_received_kernel``, one launch: per (batch, head, 64-query block),
each query's log-sum-exp and the column sums of P = exp(s - lse) over the block's
queries (per-block partials; the launcher sums them in a fixed order, so ``received``
is bit-identical run to run without float atomics). For T <= 256 (every 224 px
model) the block's whole key row is one on-chip tile: q.k^T is computed once. Longer
rows take two loops over key tiles in the same kernel (online max / sum, then P).

The helpers ``scaled_queries``, ``keys_t``, ``key_bias`` and ``logits_tile`` are shared
with ``_fused_attention_output_kernel`` (FROM_QK), so both kernels compute the same
logits with the same operand rounding.
"""
import triton
import triton.language as tl


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
def logits_tile(qs, kt, bias, QK_PRECISION: tl.constexpr):
    """s = qs @ K^T + bias in float32 (fp32 accumulation): (BLOCK_M, BLOCK_N)."""
    return tl.dot(qs, kt, input_precision=QK_PRECISION).to(tl.float32) + bias[None, :]


@triton.jit
def _attention_lse_received_kernel(
    q_ptr, stride_qb, stride_qh, stride_qt, stride_qd,
    k_ptr, stride_kb, stride_kh, stride_kt, stride_kd,
    logs_ptr, stride_lb, stride_lt,  # log_size (B, T), HAS_LOG_SIZE only
    lse_ptr,  # (B, H, T) float32, contiguous
    part_ptr,  # (B, H, n_query_blocks, T) float32, contiguous: column sums of P * inv_norm
    scale,
    inv_norm,  # 1 / (H * T): received is the mean over heads and queries
    H, T, D,
    HAS_LOG_SIZE: tl.constexpr,
    QK_PRECISION: tl.constexpr,  # "ieee" or "tf32" for float32 q, k (as torch's matmul setting)
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per tile (>= T when ONE_TILE)
    BLOCK_D: tl.constexpr,
    ONE_TILE: tl.constexpr,  # the whole key row in one tile: q.k^T once
):
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
    qs = scaled_queries(q_ptr + b * stride_qb + h * stride_qh, offs_m, mask_m, stride_qt, stride_qd,
                        offs_d, mask_d, scale)

    if ONE_TILE:
        offs_k = tl.arange(0, BLOCK_N)
        mask_k = offs_k < T
        kt = keys_t(k_row, offs_k, mask_k, stride_kt, stride_kd, offs_d, mask_d)
        s = logits_tile(qs, kt, key_bias(logs_row, offs_k, mask_k, stride_lt, HAS_LOG_SIZE), QK_PRECISION)
        m_i = tl.max(s, axis=1)
        e = tl.exp(s - m_i[:, None])
        l_i = tl.sum(e, axis=1)
        lse = m_i + tl.log(l_i)
        # Padding query rows (past T) hold finite logits; they are zeroed here.
        p = tl.where(mask_m[:, None], e * (1.0 / l_i)[:, None], 0.0)
        tl.store(part_row + offs_k, tl.sum(p, axis=0) * inv_norm, mask=mask_k)
    else:
        # Loop 1, online softmax normaliser: m = running max, l = sum exp(s - m). The
        # first key tile holds key 0, so m is finite after one step.
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, T, BLOCK_N):
            offs_k = k0 + tl.arange(0, BLOCK_N)
            mask_k = offs_k < T
            kt = keys_t(k_row, offs_k, mask_k, stride_kt, stride_kd, offs_d, mask_d)
            s = logits_tile(qs, kt, key_bias(logs_row, offs_k, mask_k, stride_lt, HAS_LOG_SIZE), QK_PRECISION)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m_i = m_new
        lse = m_i + tl.log(l_i)
        # Loop 2: P per key tile, summed over this block's queries.
        for k0 in range(0, T, BLOCK_N):
            offs_k = k0 + tl.arange(0, BLOCK_N)
            mask_k = offs_k < T
            kt = keys_t(k_row, offs_k, mask_k, stride_kt, stride_kd, offs_d, mask_d)
            s = logits_tile(qs, kt, key_bias(logs_row, offs_k, mask_k, stride_lt, HAS_LOG_SIZE), QK_PRECISION)
            p = tl.where(mask_m[:, None], tl.exp(s - lse[:, None]), 0.0)
            tl.store(part_row + offs_k, tl.sum(p, axis=0) * inv_norm, mask=mask_k)
    tl.store(lse_ptr + bh * T + offs_m, lse, mask=mask_m)
