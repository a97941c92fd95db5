"""Triton kernels of ``fusion_attention`` (SPEC section 6), flash-style: the
(B, H, T, T) probabilities are recomputed tile by tile from q and k and never
written to memory.

- ``_attention_lse_kernel``: each query's log-sum-exp over the keys (online
  max / sum over key blocks).
- ``_attention_received_qk_kernel``: per key block, column sums of
  P = exp(s - lse) over all queries of one head (the launcher sums the heads in a
  fixed order: deterministic, no atomics).

The helpers ``scaled_queries``, ``keys_t``, ``key_bias`` and ``logits_tile`` are shared with
``_fused_attention_output_kernel`` (FROM_QK), so every kernel computes the same
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
def _attention_lse_kernel(
    q_ptr, stride_qb, stride_qh, stride_qt, stride_qd,
    k_ptr, stride_kb, stride_kh, stride_kt, stride_kd,
    logs_ptr, stride_lb, stride_lt,  # log_size (B, T), HAS_LOG_SIZE only
    lse_ptr,  # (B, H, T) float32, contiguous
    scale,
    H, T, D,
    HAS_LOG_SIZE: tl.constexpr,
    QK_PRECISION: tl.constexpr,  # "ieee" or "tf32" for float32 q, k (as torch's matmul setting)
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    mb = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < T
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    k_row = k_ptr + b * stride_kb + h * stride_kh
    logs_row = logs_ptr + b * stride_lb
    qs = scaled_queries(q_ptr + b * stride_qb + h * stride_qh, offs_m, mask_m, stride_qt, stride_qd,
                        offs_d, mask_d, scale)

    # Online softmax normaliser: m = running max, l = sum exp(s - m). The first key
    # block holds key 0, so m is finite after one step (exp(-inf - m) = 0 then).
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
    tl.store(lse_ptr + bh * T + offs_m, m_i + tl.log(l_i), mask=mask_m)


@triton.jit
def _attention_received_qk_kernel(
    q_ptr, stride_qb, stride_qh, stride_qt, stride_qd,
    k_ptr, stride_kb, stride_kh, stride_kt, stride_kd,
    logs_ptr, stride_lb, stride_lt,
    lse_ptr,  # (B, H, T) float32, contiguous: from _attention_lse_kernel
    part_ptr,  # (B, H, T) float32, contiguous: per-head column sums of P
    scale,
    H, T, D,
    HAS_LOG_SIZE: tl.constexpr,
    QK_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per step
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    nb = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_k = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < T
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q_row = q_ptr + b * stride_qb + h * stride_qh
    kt = keys_t(k_ptr + b * stride_kb + h * stride_kh, offs_k, mask_k, stride_kt, stride_kd, offs_d, mask_d)
    bias = key_bias(logs_ptr + b * stride_lb, offs_k, mask_k, stride_lt, HAS_LOG_SIZE)

    # Keep a (BLOCK_M, BLOCK_N) accumulator and reduce the query axis once at the end.
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for m0 in range(0, T, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < T
        qs = scaled_queries(q_row, offs_m, mask_m, stride_qt, stride_qd, offs_d, mask_d, scale)
        s = logits_tile(qs, kt, bias, QK_PRECISION)
        lse = tl.load(lse_ptr + bh * T + offs_m, mask=mask_m, other=0.0)
        acc += tl.where(mask_m[:, None], tl.exp(s - lse[:, None]), 0.0)
    tl.store(part_ptr + bh * T + offs_k, tl.sum(acc, axis=0), mask=mask_k)
