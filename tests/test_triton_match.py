"""Fused Triton score-and-match against ``match_reference``.

float32: slot maps must be equal. On CPU the kernels run under the Triton
interpreter (tests/conftest.py), on a representative subset of shapes; on CUDA
the full grid runs. Slot maps are integer outputs and compare exactly. Random
Gaussian tokens leave node_max gaps far above the few-ulp differences of a
different dot summation order; the quantised "tie tokens" make every dot product
exact, so they check the tie-breaking rules bit for bit. ``force_gpu_configs()``
runs the GPU block sizes (the single launch's row-block and channel loops at
T = 197, the tiled path's tile loops at T = 577) under the interpreter.

Half precision: slot maps may differ only at near-ties (``_check_half``).
"""
import itertools

import pytest
import torch

import mctf_kernels
from mctf_kernels import match_reference
from mctf_kernels.triton import match as triton_match
from mctf_kernels.triton.configs import force_gpu_configs

ON_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.usefixtures("triton_backend")


def _inputs(device, B, T, C, *, attn=True, size=True, dtype=torch.float32):
    x = torch.randn(B, T, C, device=device).to(dtype)
    a = torch.softmax(2 * torch.randn(B, T, device=device), dim=-1) if attn else None
    # random positive sizes, like token counts after earlier merges (plus fractional noise)
    s = torch.randint(1, 8, (B, T), device=device).float() * (0.5 + torch.rand(B, T, device=device)) if size else None
    return x, a, s


def _tie_tokens(device, B, T, C, nonzeros=16):
    """Tokens with `nonzeros` entries of +-1 (times a power of two): the norm is
    exact and every cosine is k/nonzeros whatever the summation order, so the
    scores hold many exact ties and both sides must break them the same way."""
    idx = torch.rand(B, T, C, device=device).argsort(dim=-1)[..., :nonzeros]
    signs = torch.randint(0, 2, (B, T, nonzeros), device=device).float() * 2 - 1
    x = torch.zeros(B, T, C, device=device).scatter_(2, idx, signs)
    return x * 2.0 ** torch.randint(-3, 4, (B, T, 1), device=device).float()


def _check(x, r, a=None, s=None, **kw):
    got = mctf_kernels.match(x, r, a, s, **kw)
    want = match_reference(x, r, a, s, **kw)
    assert got.dtype == torch.int64 and got.shape == want.shape
    if not torch.equal(got, want):
        bad = (got != want).nonzero()[:8].tolist()
        pytest.fail(f"slot maps differ at {(got != want).sum().item()} tokens, first (b, t): {bad}")
    return got


def _r_values(T, num_protected):
    limit = (T - num_protected) // 2
    return sorted({1, limit // 3 or 1, limit})


# ---------------------------------------------------------------- shape grid
if ON_CUDA:
    GRID = list(itertools.product([5, 196, 197, 577, 1370], [64, 192, 384, 768, 1280], [True, False], [0, 1, 2]))
else:
    # interpreter: every T, every C, both directions and every num_protected,
    # without the full product (the interpreter's dot is a slow numpy loop)
    GRID = [
        (5, 64, True, 1), (5, 64, False, 0), (5, 192, True, 2),
        (196, 64, True, 0), (196, 64, False, 2), (196, 384, True, 1),
        (197, 64, True, 1), (197, 64, False, 1), (197, 192, True, 2), (197, 384, False, 0),
        (577, 64, True, 1), (577, 64, False, 2), (577, 192, True, 0),
    ]


@pytest.mark.parametrize("T,C,bidirectional,num_protected", GRID)
def test_matches_reference_grid(device, T, C, bidirectional, num_protected):
    B = 3 if (T * C) % 2 == 0 else 1  # alternate batch sizes across the grid
    B = 1 if (not ON_CUDA and T == 577) else B
    x, a, s = _inputs(device, B, T, C)
    for r in _r_values(T, num_protected):
        _check(x, r, a, s, num_protected=num_protected, bidirectional=bidirectional)


# ---------------------------------------------------------------- criteria
TAUS = [
    (1.0, 20.0, 40.0),  # presets
    (0.0, 20.0, 40.0),  # similarity off
    (1.0, 0.0, 40.0),  # informativeness off
    (1.0, 20.0, 0.0),  # size off
    (0.0, 0.0, 1.0),  # size only, exponent 1
    (2.0, 1.0, 3.0),  # sqrt, identity, general pow
    (0.5, 0.5, 1.0 / 3),  # squares and cubes (torch's special cases)
    (1.7, 5.0, 40.0),  # general pow everywhere
]


_ON_OFF = [(True, True), (True, False), (False, True), (False, False)]
if ON_CUDA:
    CRITERIA = [(taus, wa, ws) for taus in TAUS for wa, ws in _ON_OFF]
else:  # interpreter: every temperature set with both inputs, on/off with two sets
    CRITERIA = [(taus, True, True) for taus in TAUS] + [(taus, wa, ws) for taus in TAUS[:2] for wa, ws in _ON_OFF[1:]]


@pytest.mark.parametrize(
    "taus,with_attn,with_size", CRITERIA,
    ids=["-".join(f"{v:g}" for v in t) + f"-attn{int(wa)}-size{int(ws)}" for t, wa, ws in CRITERIA],
)
def test_criteria(device, taus, with_attn, with_size):
    tau_sim, tau_info, tau_size = taus
    x, a, s = _inputs(device, 2, 197, 64, attn=with_attn, size=with_size)
    for num_protected, bidirectional in [(1, True), (0, False), (2, True)]:
        _check(x, 48, a, s, tau_sim=tau_sim, tau_info=tau_info, tau_size=tau_size,
               num_protected=num_protected, bidirectional=bidirectional)


EVERY_R = [(T, n_p) for T in ([2, 3, 5, 6, 11, 196, 197, 577] if ON_CUDA else [5, 6, 197])
           for n_p in (0, 1, 2, 3, 5) if n_p <= T - 2]


@pytest.mark.parametrize("T,num_protected", EVERY_R)
def test_every_r(device, T, num_protected):
    """Every r from 1 to its maximum (small T) or a sweep (larger T)."""
    limit = (T - num_protected) // 2
    rs = range(1, limit + 1) if limit <= 8 else sorted({1, 2, 3, limit // 2, limit - 1, limit})
    x, a, s = _inputs(device, 2, T, 64)
    for r in rs:
        for bidirectional in (True, False):
            _check(x, r, a, s, num_protected=num_protected, bidirectional=bidirectional)


_TIE_MODES = [(1.0, False), (0.5, True), (2.0, True), (0.0, True)]
if ON_CUDA:
    TIES = [(T, *m) for T in [5, 196, 197, 577, 1370] for m in _TIE_MODES]
else:
    TIES = [(T, *m) for T in [5, 197] for m in _TIE_MODES] + [(577, 1.0, False)]


@pytest.mark.parametrize("T,tau_sim,with_size", TIES)
def test_exact_ties(device, T, tau_sim, with_size):
    """Quantised tokens: node_max, argmax rows and columns are full of exact ties."""
    B = 1 if (T == 577 and not ON_CUDA) else 2
    x = _tie_tokens(device, B, T, 64)
    s = torch.randint(1, 4, (B, T), device=device).float() if with_size else None
    for num_protected, bidirectional in [(0, True), (1, True), (2, False), (3, True)]:
        for r in _r_values(T, num_protected):
            _check(x, r, None, s, tau_sim=tau_sim, tau_size=1.0, num_protected=num_protected,
                   bidirectional=bidirectional)


# ---------------------------------------------------------------- GPU launch configurations
FORCED = [(197, 384, True, 1), (197, 64, False, 2), (197, 64, True, 0), (577, 64, True, 1), (577, 64, False, 2)]


@pytest.mark.parametrize("T,C,bidirectional,num_protected", FORCED)
def test_gpu_configs_under_interpreter(device, T, C, bidirectional, num_protected):
    """The GPU block sizes and loops (fused: 64-row blocks, 16-channel chunks, 32-key
    rank chunks; tiled: 64 x 64 tiles) cross their boundaries at T = 197 / 577."""
    x, a, s = _inputs(device, 2 if T == 197 else 1, T, C)
    before = triton_match.launch_count
    with force_gpu_configs():
        for r in _r_values(T, num_protected):
            _check(x, r, a, s, num_protected=num_protected, bidirectional=bidirectional)
        x_t = _tie_tokens(device, 1, T, 64)
        _check(x_t, (T - num_protected) // 3, None, torch.randint(1, 4, (1, T), device=device).float(),
               tau_sim=1.0, tau_size=1.0, num_protected=num_protected, bidirectional=bidirectional)
    per_call = 1 if T <= 256 else (5 if bidirectional else 4)
    assert triton_match.launch_count - before == per_call * (len(_r_values(T, num_protected)) + 1)


# The batch policy: with more images than SMs, halves <= 64 run 8 warps and 32-row
# score blocks (2 CTAs per SM); with at most one image per SM (batch 1) 16 warps and
# 64-row blocks. SMs are patched to 1 so that B = 2 takes the many-images branch.
POLICY = [(117, 64, True, 1), (101, 48, False, 2), (53, 64, True, 0), (37, 32, True, 1)]


def _record_configs(monkeypatch, sms):
    seen = []
    real = triton_match.match_configs

    def recording(*args, **kwargs):
        cfg = real(*args, **kwargs)
        seen.append(cfg)
        return cfg
    monkeypatch.setattr(triton_match, "match_configs", recording)
    monkeypatch.setattr(triton_match, "sm_count", lambda device: sms)
    return seen


@pytest.mark.parametrize("T,C,bidirectional,num_protected", POLICY)
@pytest.mark.parametrize("sms", [1, 132])
def test_batch_policy_gpu_configs(device, monkeypatch, T, C, bidirectional, num_protected, sms):
    """Both branches of the batch policy, with GPU block sizes, equal the reference bit for
    bit (random and exact-tie tokens), and the ToMe cosine score runs through them too."""
    seen = _record_configs(monkeypatch, sms)
    x, a, s = _inputs(device, 2, T, C)
    x_t = _tie_tokens(device, 2, T, C)
    with force_gpu_configs():
        for r in _r_values(T, num_protected):
            _check(x, r, a, s, num_protected=num_protected, bidirectional=bidirectional)
            _check(x_t, r, None, torch.randint(1, 4, (2, T), device=device).float(), tau_sim=1.0,
                   tau_size=1.0, num_protected=num_protected, bidirectional=bidirectional)
            _check(x_t, r, num_protected=num_protected, bidirectional=bidirectional, score="cosine")
    half_width = 1 << ((T + 1) // 2 - 1).bit_length()
    want = (8, 32) if sms == 1 and half_width <= 32 else (16, 64)  # fp32: 8 warps up to 32-wide halves
    assert seen and all(c["fused"] for c in seen)
    assert {(c["num_warps"], min(c["BLOCK_M"], c["BLOCK_A"])) for c in seen} == {(want[0], min(want[1], half_width))}


@pytest.mark.parametrize("T,C,sms,warps,rows", [(117, 160, 1, 8, 32), (197, 160, 132, 16, 64)])
def test_batch_policy_half_precision(device, monkeypatch, T, C, sms, warps, rows):
    """fp16 with the GPU configurations: 64-channel chunks (C = 160 ends in a partial one),
    8 warps / 32-row blocks with more images than SMs (64-wide halves), 16 warps / 64-row
    blocks at 128-wide halves; the half-precision contract (differences only at near-ties)."""
    seen = _record_configs(monkeypatch, sms)
    x, a, s = _inputs(device, 2, T, C, dtype=torch.float16)
    rs = _r_values(T, 1)
    with force_gpu_configs():
        differing = sum(_check_half(x, r, a, s, torch.float16) for r in rs)
    assert differing <= 0.02 * 2 * T * len(rs)
    assert {(c["num_warps"], c["BLOCK_M"], c["BLOCK_C"]) for c in seen} == {(warps, rows, 64)}


# ---------------------------------------------------------------- non-finite inputs
@pytest.mark.parametrize("T", [197, 577])
def test_non_finite_inputs(device, T):
    """NaN/inf anywhere: every slot stays in [0, T - r) and the map equals the
    reference's (NaN scores rank first, ties to the lower index, as torch orders NaN)."""
    C = 64
    x, a, s = _inputs(device, 2, T, C)
    x[0, 5] = float("nan")
    x[1, :20] = float("inf")
    a[1, 7] = float("nan")
    s[0, 3] = 0.0  # 1 / size = inf: the size factors of that image are NaN
    cases = [(x, a, s), (torch.full_like(x, float("nan")), a, s), (x, None, None)]
    for xx, aa, ss in cases:
        for num_protected, bidirectional in [(1, True), (2, False), (0, True)]:
            r = (T - num_protected) // 2
            got = _check(xx, r, aa, ss, num_protected=num_protected, bidirectional=bidirectional)
            assert int(got.min()) >= 0 and int(got.max()) < T - r


# ---------------------------------------------------------------- half precision
# Documented bound for the half path (docs/algorithm.md, "Precision"): kernel and
# reference both compute base = ((round_h(cos) + 1) / 2).clamp(0), each op rounded
# to the half dtype h (unit roundoff u = 2^-11 fp16, 2^-8 bf16), from m = x / ||x||
# rounded to h. Against the exact (float64) base, the kernel's base is off by at most
#   m rounded to h: |d cos| <= 2u (both operands, Cauchy-Schwarz) -> 1u on base
#   cos rounded to h: u/2 on cos -> u/4 on base; cos + 1 rounded: u -> u/2 on base
#   fp32 accumulation over C channels: C * 2^-24 on cos -> C * 2^-25 on base
# so d_base <= 1.75u + C 2^-25 (<= 2u + C 2^-25 below). pow(base, e) and the
# info/size factors (<= 1, fp32, a few fp32 ulp) give |d score| <= e * max(1,
# base^(e-1)) * d_base + 2^-20. A choice x of the kernel over y (exact score of y
# higher) needs kernel(x) >= kernel(y), so exact(y) - exact(x) <= 2 |d score|.
_UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _half_bound(dtype, C, tau_sim, base_min=0.5):
    e = 1.0 / tau_sim
    d_base = 2 * _UNIT[dtype] + C * 2.0 ** -25
    return 2 * (e * max(1.0, base_min ** (e - 1)) * d_base + 2.0 ** -20)


def _scores64(x, a, s, tau_sim, tau_info, tau_size, num_protected):
    """The exact scores: the reference's formula evaluated in float64."""
    xd = x.double()
    m = xd / xd.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
    score = ((cos + 1) / 2).clamp_min(0) ** (1.0 / tau_sim)
    if a is not None and tau_info:
        inv = 1.0 / a.double().clamp_min(1e-12)
        i = inv / inv.amax(dim=1, keepdim=True)
        score = score * (i[:, ::2, None] * i[:, None, 1::2]) ** (1.0 / tau_info)
    if s is not None and tau_size:
        inv = 1.0 / s.double()
        z = inv / inv.amax(dim=1, keepdim=True)
        score = score * (z[:, ::2, None] * z[:, None, 1::2]) ** (1.0 / tau_size)
    score[:, : (num_protected + 1) // 2, :] = float("-inf")
    score[:, :, : num_protected // 2] = float("-inf")
    return score


def _unidirectional_decisions(dest, t1, r):
    """Stage-1 sources and their B tokens, read back from a unidirectional slot map
    with num_protected <= 1 (unmerged A slots come first, then B tokens in order)."""
    n_unm = t1 - r
    slot_a = dest[:, 0::2]
    src = slot_a >= n_unm
    return src, (slot_a - n_unm).clamp_min(0)


def _check_half(x, r, a, s, dtype, *, tau_sim=1.0, tau_info=20.0, tau_size=40.0, num_protected=1):
    """Half precision contract on unidirectional matching (every decision can be read
    back from the slot map): wherever kernel and reference disagree, the float64
    scores of the kernel's choice and of the best alternative differ by at most
    ``_half_bound``: the B token each source merges into, and the cut between
    sources and kept A tokens (node_max). Returns the number of differing tokens."""
    kw = dict(tau_sim=tau_sim, tau_info=tau_info, tau_size=tau_size, num_protected=num_protected,
              bidirectional=False)
    got = mctf_kernels.match(x, r, a, s, **kw)
    want = match_reference(x, r, a, s, **kw)
    assert got.dtype == torch.int64 and got.shape == want.shape
    B, T = got.shape
    assert int(got.min()) >= 0 and int(got.max()) < T - r
    eps = _half_bound(dtype, x.shape[-1], tau_sim)
    s64 = _scores64(x, a, s, tau_sim, tau_info, tau_size, num_protected)
    for dest in (got, want):
        _assert_near_optimal(dest, s64, r, eps)
    return int((got != want).sum())


def _assert_near_optimal(dest, s64, r, eps):
    """A unidirectional slot map's decisions against the exact scores s64: each
    source's B token within eps of its row's best, and the r sources the top-r rows
    by exact node_max up to eps at the cut."""
    B, t1, _ = s64.shape
    best64 = s64.max(dim=-1).values
    src, b_of = _unidirectional_decisions(dest, t1, r)
    assert torch.equal(src.sum(dim=1), torch.full((B,), r, device=src.device))
    chosen = s64.gather(2, b_of[:, :, None]).squeeze(2)
    gap = torch.where(src, best64 - chosen, torch.zeros_like(chosen))
    assert float(gap.max()) <= eps, f"a merge {float(gap.max()):.3g} below the row's best (bound {eps:.3g})"
    lowest_src = torch.where(src, best64, torch.full_like(best64, float("inf"))).min(dim=1).values
    highest_kept = torch.where(~src, best64, torch.full_like(best64, float("-inf"))).max(dim=1).values
    assert float((highest_kept - lowest_src).max()) <= eps, "a kept row beats a source by more than the bound"


def test_near_tie_checker_rejects_wrong_maps(device):
    """The half-precision checker is not vacuous: a map that merges one source into a
    clearly worse B token, or keeps a clearly better row, fails it."""
    x, a, s = _inputs(device, 1, 197, 64)
    r, eps = 40, _half_bound(torch.float16, 64, 1.0)
    s64 = _scores64(x, a, s, 1.0, 20.0, 40.0, 1)
    dest = match_reference(x, r, a, s, bidirectional=False)
    _assert_near_optimal(dest, s64, r, eps)
    n_unm = 99 - r
    src_rows = (dest[0, 0::2] >= n_unm).nonzero().flatten()
    worse = dest.clone()
    a0 = int(src_rows[0])
    worse[0, 2 * a0] = n_unm + int(s64[0, a0].argmin())  # the row's worst B token
    with pytest.raises(AssertionError, match="below the row's best"):
        _assert_near_optimal(worse, s64, r, eps)
    # the strongest source kept and the weakest (unprotected) kept row merged, into its best B
    swapped = dest.clone()
    kept = (dest[0, 0::2] < n_unm).nonzero().flatten()
    kept = kept[kept > 0]  # row 0 is the protected class token
    weakest_kept = int(kept[s64[0, kept].max(dim=-1).values.argmin()])
    strongest_src = int(src_rows[s64[0, src_rows].max(dim=-1).values.argmax()])
    swapped[0, 2 * strongest_src] = dest[0, 2 * weakest_kept]
    swapped[0, 2 * weakest_kept] = n_unm + int(s64[0, weakest_kept].argmax())
    with pytest.raises(AssertionError, match="kept row beats"):
        _assert_near_optimal(swapped, s64, r, eps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_contract(device, dtype):
    """A half model's x: the similarity runs in x's dtype (tensor cores on GPU).
    bf16 runs on CUDA only: the Triton interpreter computes bf16 tl.dot wrongly."""
    if dtype == torch.bfloat16 and not ON_CUDA:
        pytest.skip("bf16 tl.dot is wrong under the Triton interpreter: bf16 is checked on CUDA only")
    shapes = [(3, 197, 384), (2, 577, 768)] if ON_CUDA else [(2, 197, 64), (1, 577, 64)]
    differing = 0
    for B, T, C in shapes:
        x, a, s = _inputs(device, B, T, C, dtype=dtype)
        for r, num_protected, tau_sim in [((T - 1) // 2, 1, 1.0), ((T - 1) // 4, 1, 1.0), (T // 3, 0, 0.5)]:
            differing += _check_half(x, r, a, s, dtype, tau_sim=tau_sim, num_protected=num_protected)
        with force_gpu_configs():
            differing += _check_half(x, (T - 1) // 3, a, s, dtype)
    # the bound is loose, not vacuous: most maps must agree token for token
    assert differing <= 0.02 * sum(B * T * 4 for B, T, _ in shapes)


def test_autocast_uses_half_similarity(device):
    """Under autocast (fp32 x), the kernel and the reference compute the cosine in the
    autocast dtype: the kernel's map must follow the half reference (near-ties only),
    and is not the fp32 map on near-tie inputs."""
    dtype = torch.float16
    x, a, s = _inputs(device, 2, 197, 64)
    with torch.autocast(device_type=x.device.type, dtype=dtype):
        assert mctf_kernels.scores.compute_dtype(x) == dtype
        _check_half(x, 98, a, s, dtype)
        _check_half(x, 40, a, s, dtype)
    assert mctf_kernels.scores.compute_dtype(x) == torch.float32
    # tokens whose cosines (1 - ~1e-4) differ below fp16 resolution (2^-11): fp32 ranks them, fp16 ties them
    xt = torch.randn(1, 1, 64, device=device) + 1e-2 * torch.randn(1, 33, 64, device=device)
    with torch.autocast(device_type=x.device.type, dtype=dtype):
        _check_half(xt, 16, None, None, dtype, num_protected=0)
        half_map = mctf_kernels.match(xt, 16, None, None, bidirectional=False, num_protected=0)
    fp32_map = _check(xt, 16, None, None, bidirectional=False, num_protected=0)
    assert not torch.equal(half_map, fp32_map)


def test_strided_inputs(device):
    """Strides are passed to the kernels: tokens, channels and per-token inputs
    may all be non-contiguous."""
    B, T, C = 2, 197, 96
    y = torch.randn(B, C, 2 * T, device=device)
    x = y.transpose(1, 2)[:, ::2, :]  # token stride 2, channel stride 2T
    assert x.stride(2) != 1 and not x.is_contiguous()
    a = torch.softmax(torch.randn(B, 2 * T, device=device), dim=-1)[:, ::2]
    s = (1 + torch.rand(T, B, device=device)).t()
    for num_protected in (0, 1, 2):
        _check(x, 60, a, s, num_protected=num_protected)
    x2 = torch.randn(B, T, 2 * C, device=device)[..., ::2]  # channel stride 2
    _check(x2, 60, a, s, num_protected=1, bidirectional=False)


def test_zero_tokens_and_uniform_sizes(device):
    """A zero token (norm clamped, cos = 0) and all-one sizes (factor exactly 1)."""
    x, a, _ = _inputs(device, 2, 197, 64, size=False)
    x[:, 3] = 0
    x[1, 10:20] = 0
    _check(x, 64, a, torch.ones(2, 197, device=device), num_protected=1)


# ---------------------------------------------------------------- plumbing
def test_kernels_ran(device, monkeypatch):
    """The public op goes through the Triton launcher: ONE launch for T <= 256 (the
    single-launch kernel), one per stage on the tiled path."""
    for T, bidir_launches, uni_launches in [(197, 1, 1), (256, 1, 1), (257, 5, 4)]:
        x, a, s = _inputs(device, 2, T, 32)
        before = triton_match.launch_count
        _check(x, 16, a, s, bidirectional=True)
        assert triton_match.launch_count - before == bidir_launches, T
        before = triton_match.launch_count
        _check(x, 16, a, s, bidirectional=False)
        assert triton_match.launch_count - before == uni_launches, T  # no column max without stage 2
    before = triton_match.launch_count
    out = _check(x, 0, a, s)
    assert triton_match.launch_count == before  # r = 0: the identity, no launch
    assert torch.equal(out, torch.arange(T, device=device).expand(2, T))
    assert mctf_kernels.triton.LAUNCHERS["match"] is triton_match.match_triton


def test_errors(device, monkeypatch):
    x, a, s = _inputs(device, 1, 33, 16)
    monkeypatch.setattr(triton_match, "MAX_TOKENS", 32)
    with pytest.raises(ValueError, match="T <= 32"):
        triton_match.match_triton(x, 4, a, s)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="r must be in"):
        triton_match.match_triton(x, 17, a, s)
    with pytest.raises(ValueError, match="attn_received"):
        triton_match.match_triton(x, 4, a[:, :-1], s)
    with pytest.raises(ValueError, match="tau_info"):
        triton_match.match_triton(x, 4, a, s, tau_info=-1.0)
    if not ON_CUDA:
        # without the interpreter a CPU tensor has no Triton path: the dispatcher
        # says so, and the launcher itself refuses too
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(mctf_kernels.BackendUnavailable):
            mctf_kernels.match(x, 4, a, s)
        with pytest.raises(ValueError, match="CUDA tensor"):
            triton_match.match_triton(x, 4, a, s)


@pytest.mark.skipif(not ON_CUDA, reason="torch.compile of Triton kernels needs CUDA")
def test_torch_compile(device):
    """The op is a triton_op: torch.compile traces it without graph breaks."""
    if not hasattr(torch.library, "triton_op"):
        pytest.skip("torch.library.triton_op needs torch >= 2.6")
    x, a, s = _inputs(device, 2, 197, 192)

    def f(x, a, s):
        return torch.ops.mctf.match(x, 32, a, s, 1.0, 20.0, 40.0, 1, True, 0)  # 0: fp32 similarity

    got = torch.compile(f, fullgraph=True)(x, a, s)
    assert torch.equal(got, match_reference(x, 32, a, s))

    def g(x, a, s):  # the public op reads the autocast state while tracing
        with torch.autocast("cuda", dtype=torch.float16):
            return mctf_kernels.match(x, 32, a, s)

    with mctf_kernels.use_backend("triton"):
        got = torch.compile(g, fullgraph=True)(x, a, s)
    with torch.autocast("cuda", dtype=torch.float16):
        assert torch.equal(got, mctf_kernels.match(x, 32, a, s))


# ---------------------------------------------------------------- ToMe's raw cosine score
COSINE = [(5, 0, 64), (197, 1, 64), (198, 2, 64), (196, 0, 192), (577, 1, 64)]


@pytest.mark.parametrize("T,num_protected,C", COSINE)
def test_cosine_score(device, T, num_protected, C):
    """score="cosine" (Token Merging): every r, both directions, against the reference."""
    B = 1 if (T == 577 and not ON_CUDA) else 2
    x = torch.randn(B, T, C, device=device)
    for r in _r_values(T, num_protected):
        for bidirectional in (False, True):
            _check(x, r, num_protected=num_protected, bidirectional=bidirectional, score="cosine")


@pytest.mark.parametrize("T", [197, 577])
def test_cosine_exact_ties_and_gpu_configs(device, T):
    """Quantised tokens (exact cosine ties, negative ones included) with the default and the
    GPU launch configurations; zero and NaN tokens keep every slot in range."""
    x = _tie_tokens(device, 1, T, 64)
    before = triton_match.launch_count
    for num_protected in (0, 1, 2):
        _check(x, (T - num_protected) // 3, num_protected=num_protected, bidirectional=False, score="cosine")
        with force_gpu_configs():
            _check(x, (T - num_protected) // 2, num_protected=num_protected, bidirectional=False, score="cosine")
    assert triton_match.launch_count - before == 6 * (1 if T <= 256 else 4)
    y = torch.randn(1, T, 64, device=device)
    y[0, 4] = 0
    y[0, 9] = float("nan")
    got = _check(y, (T - 1) // 2, num_protected=1, bidirectional=False, score="cosine")
    assert int(got.max()) < T - (T - 1) // 2


def _cosine64(x, num_protected):
    xd = x.double()
    m = xd / xd.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
    cos[:, : (num_protected + 1) // 2, :] = float("-inf")
    cos[:, :, : num_protected // 2] = float("-inf")
    return cos


def test_cosine_half_precision(device):
    """fp16 raw cosine: wherever kernel and reference disagree, the exact cosines of the two
    choices are within twice the rounding bound of a half cosine (m rounded: 2u, the
    result rounded: u/2, fp32 accumulation: C 2^-24)."""
    dtype = torch.float16
    differing = 0
    for B, T, C in ([(2, 197, 64), (1, 577, 64)] if not ON_CUDA else [(3, 197, 384), (2, 577, 768)]):
        x = torch.randn(B, T, C, device=device).to(dtype)
        eps = 2 * (2.5 * _UNIT[dtype] + C * 2.0 ** -24)
        for r in ((T - 1) // 2, (T - 1) // 4):
            kw = dict(num_protected=1, bidirectional=False, score="cosine")
            got = mctf_kernels.match(x, r, **kw)
            want = match_reference(x, r, **kw)
            s64 = _cosine64(x, 1)
            for dest in (got, want):
                _assert_near_optimal(dest, s64, r, eps)
            differing += int((got != want).sum())
    assert differing <= 0.02 * 2 * (2 * 197 + 577)


# ---------------------------------------------------------------- the slot index from the matcher
def _check_slots(x, r, a=None, s=None, **kw):
    """``match(..., return_slots=True)``: the map is ``match``'s, and its slot index equals
    ``slot_index_reference`` of that map exactly (integers: order and starts)."""
    dest, slots = mctf_kernels.match(x, r, a, s, **kw, return_slots=True)
    assert torch.equal(dest, mctf_kernels.match(x, r, a, s, **kw))
    T = x.shape[1]
    want = mctf_kernels.slot_index_reference(dest, T - r)
    assert isinstance(slots, mctf_kernels.SlotIndex)
    assert slots.order.dtype == slots.starts.dtype == torch.int64
    assert slots.order.shape == (x.shape[0], T) and slots.starts.shape == (x.shape[0], T - r + 1)
    assert torch.equal(slots.order, want.order), (slots.order, want.order)
    assert torch.equal(slots.starts, want.starts), (slots.starts, want.starts)
    return dest, slots


def _no_slot_index_launch(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the single-launch matcher must not launch the slot-index kernel")
    monkeypatch.setattr(triton_match, "launch_slot_index", refuse)


# (T, bidirectional, num_protected, score): T = 197 (DeiT-S, 64-row blocks), 256 (the largest
# single launch: 128-wide halves, a full 256-key sort), 21 (4 warps), 117 (64-wide halves),
# 53 (8 warps and 32-row blocks: more images than SMs)
SLOTS = [(197, True, 1, "mctf"), (197, False, 0, "mctf"), (197, True, 2, "mctf"), (256, True, 1, "mctf"),
         (256, False, 3, "cosine"), (21, True, 1, "mctf"), (21, False, 2, "cosine"), (117, True, 1, "mctf"),
         (53, True, 2, "mctf"), (197, False, 1, "cosine")]


@pytest.mark.parametrize("T,bidirectional,num_protected,score", SLOTS)
def test_matcher_slot_index(device, monkeypatch, T, bidirectional, num_protected, score):
    """The single launch writes the slot index itself (no slot-index kernel), with the GPU
    launch configurations and the interpreter's, at several r: random tokens against the
    reference map, quantised tokens (many slots hit by several sources, exact ties)."""
    _no_slot_index_launch(monkeypatch)
    seen = _record_configs(monkeypatch, 1)  # B = 2 > SMs: the many-images branch where it applies
    x, a, s = _inputs(device, 2, T, 64)
    if score == "cosine":
        a = s = None
    kw = dict(num_protected=num_protected, bidirectional=bidirectional, score=score)
    limit = (T - num_protected) // 2
    before = triton_match.launch_count
    with force_gpu_configs():
        for r in sorted({1, limit // 3 or 1, limit}):
            dest, _ = _check_slots(x, r, a, s, **kw)
            assert torch.equal(dest, match_reference(x, r, a, s, **kw))
        x_t = _tie_tokens(device, 2, T, 64)
        _check_slots(x_t, limit, None if score == "cosine" else a, None, **kw)
    _check_slots(x, limit // 2 or 1, a, s, **kw)  # the interpreter's blocks (one sort of every token)
    calls = len({1, limit // 3 or 1, limit}) + 2
    assert triton_match.launch_count - before == 2 * calls  # with and without slots: one launch each
    warps = {c["num_warps"] for c in seen[:-2]}  # the GPU configurations
    assert warps == {4 if T <= 32 else 8 if T == 53 else 16}, warps


def test_matcher_slot_index_half_precision(device, monkeypatch):
    """fp16 (tensor-core similarity): the index is that of the kernel's own map."""
    _no_slot_index_launch(monkeypatch)
    x, a, s = _inputs(device, 2, 197, 64, dtype=torch.float16)
    with force_gpu_configs():
        _check_slots(x, 64, a, s)
    with torch.autocast(device_type=x.device.type, dtype=torch.float16):
        _check_slots(x.float(), 98, a, s, bidirectional=False)


def test_tiled_path_slot_index(device, monkeypatch):
    """T > 256 takes the tiled matcher, which never holds a whole map: the launcher adds one
    slot-index launch, and the index is still exact."""
    launched = []
    real = triton_match.launch_slot_index
    monkeypatch.setattr(triton_match, "launch_slot_index", lambda *a: launched.append(a[1]) or real(*a))
    x, a, s = _inputs(device, 1, 577, 64)
    with force_gpu_configs():
        _check_slots(x, 200, a, s)
    _check_slots(x, 96, num_protected=2, bidirectional=False, score="cosine")
    assert launched == [577 - 200, 577 - 96]


def test_slot_index_edge_cases(device):
    """r = 0: every token its own slot, no launch; no image: empty index; the reference
    backend returns None (the references pool by dest), as shared_slot_index does."""
    x, a, s = _inputs(device, 2, 37, 32)
    before = triton_match.launch_count
    dest, slots = _check_slots(x, 0, a, s)
    assert triton_match.launch_count == before
    assert torch.equal(slots.order, torch.arange(37, device=device).expand(2, 37))
    dest, slots = mctf_kernels.match(x[:0], 5, a[:0], s[:0], return_slots=True)
    assert dest.shape == slots.order.shape == (0, 37) and slots.starts.shape == (0, 33)
    with mctf_kernels.use_backend("reference"):
        dest, slots = mctf_kernels.match(x, 5, a, s, return_slots=True)
    assert slots is None and torch.equal(dest, match_reference(x, 5, a, s))
    with pytest.raises(TypeError, match="return_slots must be a bool"):
        mctf_kernels.match(x, 5, a, s, return_slots="no")


@pytest.mark.skipif(not ON_CUDA, reason="torch.compile of Triton kernels needs CUDA")
def test_torch_compile_match_slots(device):
    """``mctf::match_slots`` (map and index in one op) traces without graph breaks, and the
    ``mctf::match`` schema is unchanged."""
    x, a, s = _inputs(device, 2, 197, 192)

    def f(x, a, s):
        with torch.autocast("cuda", dtype=torch.float16):
            return mctf_kernels.match(x, 32, a, s, return_slots=True)

    with mctf_kernels.use_backend("triton"):
        dest, slots = torch.compile(f, fullgraph=True)(x, a, s)
        want = f(x, a, s)
    assert torch.equal(dest, want[0]) and torch.equal(slots.order, want[1].order)
    assert torch.equal(slots.starts, want[1].starts)
    assert torch.equal(torch.ops.mctf.match(x, 32, a, s, 1.0, 20.0, 40.0, 1, True, 0), match_reference(x, 32, a, s))
