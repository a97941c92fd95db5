"""Triton kernel of the slot index: the members of every output slot, by counting.

A token's place in ``order`` is its rank by (slot, token index): the tokens in
lower slots plus the earlier tokens of its own slot. ``starts[o]`` is the number
of tokens in slots below ``o``. Both are counts over the image's slot map, done
in tiles, so one launch serves every image with no sort and no atomics, and the
result is the stable order (ascending token index inside a slot).

A token whose slot is outside [0, T') belongs to no slot: it ranks as if in an
extra slot T', after every real member, so ``order`` stays a permutation and
nothing is written outside ``order`` and ``starts``.
"""
import triton
import triton.language as tl


@triton.jit
def _slot_index_kernel(
    dest_ptr, stride_db, stride_dt,
    order_ptr, starts_ptr,  # contiguous (B, T) and (B, T'+1) int64
    T, T_out,
    BLOCK_I: tl.constexpr,  # tokens ranked (and slot boundaries counted) per program
    BLOCK_J: tl.constexpr,  # tokens compared per step
):
    b = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < T
    row = dest_ptr + b * stride_db
    d_i = tl.load(row + offs_i.to(tl.int64) * stride_dt, mask=mask_i, other=0)
    # range check in the map's own width: a huge int64 must not wrap into range
    key_i = tl.where((d_i >= 0) & (d_i < T_out), d_i, T_out).to(tl.int32)

    pos = tl.zeros([BLOCK_I], tl.int32)  # rank of token i by (slot, index)
    below = tl.zeros([BLOCK_I], tl.int32)  # starts[o] for o = offs_i
    for j0 in range(0, T, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < T
        d_j = tl.load(row + offs_j.to(tl.int64) * stride_dt, mask=mask_j, other=0)
        key_j = tl.where((d_j >= 0) & (d_j < T_out), d_j, T_out).to(tl.int32)
        key_j = tl.where(mask_j, key_j, T_out + 1)  # padding: after every token, below no bound
        kj = key_j[None, :]
        ki = key_i[:, None]
        before = (kj < ki) | ((kj == ki) & (offs_j[None, :] < offs_i[:, None]))
        pos += tl.sum(before.to(tl.int32), axis=1)
        below += tl.sum((kj < offs_i[:, None]).to(tl.int32), axis=1)

    tl.store(order_ptr + b * T + pos, offs_i.to(tl.int64), mask=mask_i)
    tl.store(starts_ptr + b * (T_out + 1) + offs_i, below.to(tl.int64), mask=offs_i <= T_out)
