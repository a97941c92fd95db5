"""Fused Triton score-and-match against ``match_reference``: slot maps must be equal.

On CPU the kernels run under the Triton interpreter (tests/conftest.py), on a
representative subset of shapes; on CUDA the full grid runs. Slot maps are
integer outputs and compare exactly. Random Gaussian tokens leave node_max
gaps far above the few-ulp differences of a different dot summation order;
the quantised "tie tokens" make every dot product exact, so they check the
tie-breaking rules bit for bit.
"""
import itertools

import pytest
import torch

import mctf_kernels
from mctf_kernels import match_reference
from mctf_kernels.triton import match as triton_match

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


# ---------------------------------------------------------------- inputs
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(device, dtype):
    """Scores are fp32 whatever x's dtype (the reference upcasts first)."""
    shapes = [(3, 197, 384), (2, 577, 768), (1, 1370, 1280)] if ON_CUDA else [(2, 197, 64)]
    for B, T, C in shapes:
        x, a, s = _inputs(device, B, T, C, dtype=dtype)
        _check(x, (T - 1) // 4, a.to(dtype), s, num_protected=1)
        _check(x, (T - 2) // 2, a, s.to(dtype), num_protected=2, bidirectional=False)


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
    """The public op goes through the Triton launcher, one launch per stage."""
    x, a, s = _inputs(device, 2, 197, 64)
    before = triton_match.launch_count
    _check(x, 16, a, s, bidirectional=True)
    assert triton_match.launch_count - before == 5  # stats, row max, rank A, column max, assign
    before = triton_match.launch_count
    _check(x, 16, a, s, bidirectional=False)
    assert triton_match.launch_count - before == 4  # no column max without stage 2
    before = triton_match.launch_count
    out = _check(x, 0, a, s)
    assert triton_match.launch_count == before  # r = 0: the identity, no launch
    assert torch.equal(out, torch.arange(197, device=device).expand(2, 197))
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
        return torch.ops.mctf.match(x, 32, a, s, 1.0, 20.0, 40.0, 1, True)

    got = torch.compile(f, fullgraph=True)(x, a, s)
    assert torch.equal(got, match_reference(x, 32, a, s))
