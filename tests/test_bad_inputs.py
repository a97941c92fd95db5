"""Inputs the ops must refuse, or give a defined result for (issue 9), grouped by op,
on both backends: the eager reference and the Triton kernels (on CPU through the
interpreter, which conftest switches on).

Structural errors (shapes, dtypes, devices, Python numbers) are raised in ``ops.py``
before dispatch, so they read the same on both backends; value errors (slot ranges,
positive sizes, finite inputs) need ``validate=True`` or ``MCTF_VALIDATE=1``.
"""
import math

import pytest
import torch

import mctf_kernels as mk

NAN, INF = float("nan"), float("inf")


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    with mk.use_backend(request.param):
        yield request.param


def tokens(B=2, T=9, C=4):
    return torch.randn(B, T, C)


def slot_map(B=2, T=9, r=2):
    with mk.use_backend("reference"):
        return mk.match(tokens(B, T), r)


# ---------------------------------------------------------------------------
# match


@pytest.mark.parametrize("name", ["tau_sim", "tau_info", "tau_size"])
@pytest.mark.parametrize("value", [NAN, INF, -1.0, "1"])
def test_match_temperatures(backend, name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        mk.match(tokens(), 2, torch.rand(2, 9), torch.ones(2, 9), **{name: value})


@pytest.mark.parametrize("value,error", [(1.5, TypeError), (True, TypeError), (-1, ValueError), (10, ValueError)])
def test_match_num_protected(backend, value, error):
    with pytest.raises(error, match="num_protected"):
        mk.match(tokens(), 2, num_protected=value)


@pytest.mark.parametrize("r", [NAN, 2.0, True])
def test_match_r_must_be_an_int(backend, r):
    with pytest.raises(TypeError, match="r must be an int"):
        mk.match(tokens(), r)


@pytest.mark.parametrize("score", ["tome", None, 1])
def test_match_score_kind(backend, score):
    with pytest.raises(ValueError, match="score must be one of"):
        mk.match(tokens(), 2, score=score)


def test_match_cosine_takes_no_attention_or_size(backend):
    for kw in (dict(attn_received=torch.rand(2, 9)), dict(size=torch.ones(2, 9))):
        with pytest.raises(ValueError, match="neither attn_received nor size"):
            mk.match(tokens(), 2, score="cosine", **kw)
    # NaN and inf metrics: a valid map on both backends (ToMe's own code would give NaN scores)
    x = tokens(T=11)
    x[0, 3], x[1, 4] = NAN, INF
    dest = mk.match(x, 5, score="cosine", bidirectional=False)
    assert int(dest.min()) >= 0 and int(dest.max()) < 6


def test_match_per_token_inputs(backend):
    x = tokens()
    with pytest.raises(ValueError, match="size must have shape"):
        mk.match(x, 2, size=torch.ones(2, 8))
    with pytest.raises(TypeError, match="size must be a floating"):
        mk.match(x, 2, size=torch.ones(2, 9, dtype=torch.int64))
    with pytest.raises(ValueError, match="attn_received is on meta"):
        mk.match(x, 2, torch.rand(2, 9, device="meta"))


def test_match_validate(backend, monkeypatch):
    x, size, received = tokens(), torch.ones(2, 9), torch.rand(2, 9)
    bad_x = x.clone()
    bad_x[1, 3, 0] = NAN
    with pytest.raises(ValueError, match="x has 1 non-finite"):
        mk.match(bad_x, 2, received, size, validate=True)
    for bad, name in ((0.0, "size must be > 0"), (-1.0, "size must be > 0"), (INF, "size has 1 non-finite")):
        s = size.clone()
        s[0, 4] = bad
        with pytest.raises(ValueError, match=name):
            mk.match(x, 2, received, s, validate=True)
    r = received.clone()
    r[0, 1] = -0.5
    with pytest.raises(ValueError, match="attn_received must be >= 0"):
        mk.match(x, 2, r, size, validate=True)
    monkeypatch.setenv("MCTF_VALIDATE", "1")
    with pytest.raises(ValueError, match="x has 1 non-finite"):
        mk.match(bad_x, 2, received, size)
    mk.match(bad_x, 2, received, size, validate=False)  # the argument wins over the environment


def test_match_empty_batch(backend):
    dest = mk.match(torch.randn(0, 9, 4), 2, torch.rand(0, 9), torch.ones(0, 9))
    assert dest.shape == (0, 9) and dest.dtype == torch.int64


def test_match_token_limit_is_a_dispatch_reason():
    x = torch.randn(1, 65_537, 1)
    with mk.use_backend("triton"), pytest.raises(mk.BackendUnavailable, match="T <= 65536"):
        mk.match(x, 2)


# ---------------------------------------------------------------------------
# merge


@pytest.mark.parametrize("mode", [1.0, True, 4, "1"])
def test_merge_mode_must_be_an_int(backend, mode):
    with pytest.raises(ValueError, match="pooling mode must be an int"):
        mk.merge(tokens(), slot_map(), 7, None, torch.rand(2, 9), mode=mode)


def test_merge_source(backend):
    x, dest = tokens(), slot_map()
    eye = torch.eye(9).expand(2, 9, 9)
    with pytest.raises(TypeError, match="source must be a floating"):
        mk.merge(x, dest, 7, mode=0, source=eye.bool())
    with pytest.raises(ValueError, match="source is on meta"):
        mk.merge(x, dest, 7, mode=0, source=eye.to("meta"))
    with pytest.raises(ValueError, match="source must have shape"):
        mk.merge(x, dest, 7, mode=0, source=eye[:, :8])


def test_merge_dest_and_t_out(backend):
    x, dest = tokens(), slot_map()
    with pytest.raises(TypeError, match="dest must be an int32/int64"):
        mk.merge(x, dest.float(), 7, mode=0)
    with pytest.raises(ValueError, match="t_out"):
        mk.merge(x, dest, True, mode=0)
    with pytest.raises(ValueError, match="dest is on meta"):
        mk.merge(x, dest.to("meta"), 7, mode=0)


def test_merge_validate(backend):
    x, dest, size = tokens(), slot_map(), torch.ones(2, 9)
    for bad in (7, -1, 10**6):
        d = dest.clone()
        d[1, 5] = bad
        with pytest.raises(ValueError, match="dest values must lie in"):
            mk.merge(x, d, 7, size, mode=0, validate=True)
    d = dest.clone()
    d[d == 3] = 2  # slot 3 loses its members
    with pytest.raises(ValueError, match="dest leaves slot 3"):
        mk.merge(x, d, 7, size, mode=0, validate=True)
    s = size.clone()
    s[0, 0] = 0
    with pytest.raises(ValueError, match="size must be > 0"):
        mk.merge(x, dest, 7, s, mode=0, validate=True)
    bad_x = x.clone()
    bad_x[0, 0, 0] = INF
    with pytest.raises(ValueError, match="x has 1 non-finite"):
        mk.merge(bad_x, dest, 7, size, mode=0, validate=True)


def test_merge_empty_batch(backend):
    x, size, source = torch.randn(0, 9, 4), torch.ones(0, 9), torch.zeros(0, 9, 9)
    out, new_size, new_source = mk.merge(x, torch.zeros(0, 9, dtype=torch.long), 7, size, torch.rand(0, 9),
                                         mode=1, source=source)
    assert out.shape == (0, 7, 4) and new_size.shape == (0, 7) and new_source.shape == (0, 7, 9)


DEST = torch.tensor([[0, 1, 1, 2, 2, 3]])  # slot 1 = tokens 1, 2; slot 2 = tokens 3, 4


@pytest.mark.parametrize("mode", [0, 1])
def test_merge_zero_weight_slot_is_the_unweighted_mean(backend, mode):
    x = torch.randn(1, 6, 4)
    size = torch.tensor([[1.0, 0.0, 0.0, 2.0, 1.0, 1.0]]) if mode == 0 else torch.ones(1, 6)
    received = torch.tensor([[0.5, 0.0, 0.0, 0.2, 0.3, 0.1]])  # slot 1 received exactly 0.0
    out, _, _ = mk.merge(x, DEST, 4, size, received, mode=mode)
    torch.testing.assert_close(out[0, 1], x[0, 1:3].mean(0), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(out).all()
    w = size[0, 3:5] * (received[0, 3:5] if mode == 1 else 1)
    torch.testing.assert_close(out[0, 2], (x[0, 3:5] * w[:, None]).sum(0) / w.sum(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", [0, 1])
def test_merge_zero_weight_slot_gradient(backend, mode):
    """The backward agrees with the forward's unweighted mean: each member of a zero-weight
    slot gets the slot's gradient / member count."""
    x = torch.randn(1, 6, 4, requires_grad=True)
    size = torch.tensor([[1.0, 0.0, 0.0, 2.0, 1.0, 1.0]]) if mode == 0 else torch.ones(1, 6)
    received = torch.tensor([[0.5, 0.0, 0.0, 0.2, 0.3, 0.1]])
    g = torch.randn(1, 4, 4)
    out, _, _ = mk.merge(x, DEST, 4, size, received, mode=mode)
    out.backward(g)
    torch.testing.assert_close(x.grad[0, 1:3], (g[0, 1] / 2).expand(2, 4), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("where", ["x", "size", "attn_received"])
def test_merge_nan_reaches_only_its_slot(backend, where):
    x, size, received = torch.randn(1, 6, 4), torch.ones(1, 6), torch.rand(1, 6) + 0.1
    {"x": x[0, 3], "size": size[0, 3:4], "attn_received": received[0, 3:4]}[where][0] = NAN
    out, _, _ = mk.merge(x, DEST, 4, size, received, mode=1)
    nan_rows = out.isnan().any(-1)[0].tolist()
    assert nan_rows == [False, False, True, False]


# ---------------------------------------------------------------------------
# attention_received


def test_attention_received_shape_and_dtype(backend):
    with pytest.raises(ValueError, match=r"attn must have shape \(B, H, T, T\) \(square\)"):
        mk.attention_received(torch.rand(2, 3, 9, 8))
    with pytest.raises(ValueError, match="attn must have shape"):
        mk.attention_received(torch.rand(2, 9, 9))
    with pytest.raises(TypeError, match="attn must be a floating"):
        mk.attention_received(torch.ones(2, 3, 9, 9, dtype=torch.int32))


def test_attention_received_validate_and_empty(backend):
    attn = torch.rand(2, 3, 9, 9)
    attn[0, 0, 0, 0] = NAN
    with pytest.raises(ValueError, match="attn has 1 non-finite"):
        mk.attention_received(attn, validate=True)
    assert mk.attention_received(torch.rand(0, 3, 9, 9)).shape == (0, 9)


# ---------------------------------------------------------------------------
# fused_attention_output


def attention(B=2, H=3, T=9):
    return torch.softmax(torch.randn(B, H, T, T), -1)


def test_fused_output_shapes(backend):
    P, v, dest = attention(), torch.randn(2, 3, 7, 8), slot_map()
    received, size = mk.attention_received(P), torch.ones(2, 9)
    with pytest.raises(ValueError, match=r"attn must have shape \(B, H, T, T\) \(square\)"):
        mk.fused_attention_output(P[..., :8], v, dest, 7, size, received)
    with pytest.raises(ValueError, match="size must have shape"):
        mk.fused_attention_output(P, v, dest, 7, torch.ones(2, 8), received)
    with pytest.raises(ValueError, match="attn_received must have shape"):
        mk.fused_attention_output(P, v, dest, 7, size, received[:, :8])
    with pytest.raises(ValueError, match="size is on meta"):
        mk.fused_attention_output(P, v, dest, 7, size.to("meta"), received)
    with pytest.raises(ValueError, match="v must have shape"):
        mk.fused_attention_output(P, v[:, :, :6], dest, 7, size, received)
    with pytest.raises(ValueError, match="pooling mode must be an int"):
        mk.fused_attention_output(P, v, dest, 7, size, received, mode=1.0)
    with pytest.raises(ValueError, match="needs attn_received"):
        mk.fused_attention_output(P, v, dest, 7, size, None, mode=1)


def test_fused_output_validate(backend):
    P, v, dest = attention(), torch.randn(2, 3, 7, 8), slot_map()
    received, size = mk.attention_received(P), torch.ones(2, 9)
    d = dest.clone()
    d[0, 8] = 7  # one past the last slot: the Triton kernel would read past V'
    with pytest.raises(ValueError, match="dest values must lie in"):
        mk.fused_attention_output(P, v, d, 7, size, received, validate=True)
    bad_v = v.clone()
    bad_v[1, 2, 3, 4] = NAN
    with pytest.raises(ValueError, match="v has 1 non-finite"):
        mk.fused_attention_output(P, bad_v, dest, 7, size, received, validate=True)


def test_fused_output_empty_batch(backend):
    out = mk.fused_attention_output(torch.rand(0, 3, 9, 9), torch.randn(0, 3, 7, 8),
                                    torch.zeros(0, 9, dtype=torch.long), 7, torch.ones(0, 9), torch.rand(0, 9))
    assert out.shape == (0, 3, 7, 8)


def test_fused_output_zero_weight_slot(backend):
    P = attention(1, 2, 6)
    P[..., 1:3] = 0  # tokens 1 and 2 (slot 1) receive exactly 0.0: their weights are 0
    v, size = torch.randn(1, 2, 4, 8), torch.ones(1, 6)
    out = mk.fused_attention_output(P, v, DEST, 4, size, mk.attention_received(P), mode=1)
    assert torch.isfinite(out).all()
    per_query = P @ v.gather(2, DEST[:, None, :, None].expand(1, 2, 6, 8))
    torch.testing.assert_close(out[:, :, 1], per_query[:, :, 1:3].mean(2), rtol=1e-5, atol=1e-6)


def test_fused_output_zero_weight_slot_gradient(backend):
    """Gradients through a zero-weight slot are those of its unweighted mean, as the reference's."""
    P = attention(1, 2, 6)
    P[..., 1:3] = 0
    received = mk.attention_received(P)
    P.requires_grad_(True)
    v, size, g = torch.randn(1, 2, 4, 8, requires_grad=True), torch.ones(1, 6), torch.randn(1, 2, 4, 8)
    mk.fused_attention_output(P, v, DEST, 4, size, received, mode=1).backward(g)
    P2, v2 = P.detach().clone().requires_grad_(True), v.detach().clone().requires_grad_(True)
    mk.fused_attention_output_reference(P2, v2, DEST, 4, size, received, mode=1).backward(g)
    assert torch.isfinite(P.grad).all() and torch.isfinite(v.grad).all()
    torch.testing.assert_close(P.grad, P2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v.grad, v2.grad, rtol=1e-5, atol=1e-6)


def test_fused_output_nan_row_reaches_only_its_slot(backend):
    P, v, size = attention(1, 2, 6), torch.randn(1, 2, 4, 8), torch.ones(1, 6)
    received = mk.attention_received(P)
    P[0, 0, 3, :] = NAN  # query 3 of head 0 belongs to slot 2
    out = mk.fused_attention_output(P, v, DEST, 4, size, received, mode=1)
    assert out.isnan().any(-1).tolist() == [[[False, False, True, False], [False, False, False, False]]]


@pytest.mark.parametrize("where", ["size", "attn_received"])
def test_fused_output_nan_weight_reaches_only_its_slot(backend, where):
    """A NaN size or received attention: its slot's row in every head, nothing else (the
    mode-1 size maximum skips NaN)."""
    P, v, size = attention(1, 2, 6), torch.randn(1, 2, 4, 8), torch.ones(1, 6)
    received = mk.attention_received(P)
    {"size": size, "attn_received": received}[where][0, 4] = NAN  # token 4 belongs to slot 2
    out = mk.fused_attention_output(P, v, DEST, 4, size, received, mode=1)
    assert out.isnan().any(-1).tolist() == [[[False, False, True, False]] * 2]


# ---------------------------------------------------------------------------
# fusion_attention and fused_attention_output_from


def test_fusion_attention_arguments(backend):
    q, k = torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    with pytest.raises(TypeError, match="k and q must have the same dtype"):
        mk.fusion_attention(q, k.double(), scale=0.5)
    with pytest.raises(ValueError, match="k is on meta"):
        mk.fusion_attention(q, k.to("meta"), scale=0.5)
    with pytest.raises(ValueError, match="same shape"):
        mk.fusion_attention(q, k[:, :, :8], scale=0.5)
    with pytest.raises(ValueError, match="q must have shape"):
        mk.fusion_attention(q[0], k[0], scale=0.5)
    for scale in (NAN, INF, -INF, 0.0, -1.0, True, None):
        with pytest.raises(ValueError, match="scale must be a finite number > 0"):
            mk.fusion_attention(q, k, scale=scale)
    with pytest.raises(ValueError, match="log_size must have shape"):
        mk.fusion_attention(q, k, scale=0.5, log_size=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="pooling mode must be an int"):
        mk.fusion_attention(q, k, scale=0.5, mode=1.0)
    bad = q.clone()
    bad[0, 0, 0, 0] = NAN
    with pytest.raises(ValueError, match="q has 1 non-finite"):
        mk.fusion_attention(bad, k, scale=0.5, validate=True)


def test_fusion_attention_empty_batch(backend):
    q = torch.randn(0, 3, 9, 8)
    att = mk.fusion_attention(q, q, scale=0.5)
    assert att.received.shape == (0, 9)
    out = mk.fused_attention_output_from(att, torch.randn(0, 3, 7, 8), torch.zeros(0, 9, dtype=torch.long), 7,
                                         torch.ones(0, 9))
    assert out.shape == (0, 3, 7, 8)


def test_fused_output_from_arguments(backend):
    q = torch.randn(2, 3, 9, 8)
    att = mk.fusion_attention(q, q, scale=0.5)
    v, dest = torch.randn(2, 3, 7, 8), slot_map()
    with pytest.raises(ValueError, match="dest must have shape"):
        mk.fused_attention_output_from(att, v, dest[:, :8], 7)
    with pytest.raises(ValueError, match="size must have shape"):
        mk.fused_attention_output_from(att, v, dest, 7, torch.ones(2, 8))
    with pytest.raises(ValueError, match="pooling mode must be an int"):
        mk.fused_attention_output_from(att, v, dest, 7, mode=0.0)
    d = dest.clone()
    d[0, 0] = -1
    with pytest.raises(ValueError, match="dest values must lie in"):
        mk.fused_attention_output_from(att, v, d, 7, validate=True)


# ---------------------------------------------------------------------------
# bf16 under the interpreter: a dispatch reason, never wrong numbers


@pytest.mark.skipif(not mk.dispatch.interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (CPU CI)")
def test_bf16_under_the_interpreter_is_a_dispatch_reason():
    x, P = tokens().bfloat16(), attention().bfloat16()
    q = torch.randn(2, 3, 9, 8, dtype=torch.bfloat16)
    calls = [
        lambda: mk.match(x, 2),
        lambda: mk.merge(x, slot_map(), 7, mode=0),
        lambda: mk.attention_received(P),
        lambda: mk.fused_attention_output(P, torch.randn(2, 3, 7, 8, dtype=torch.bfloat16), slot_map(), 7, mode=0),
        lambda: mk.fusion_attention(q, q, scale=0.5),
    ]
    for call in calls:
        with mk.use_backend("triton"), pytest.raises(mk.BackendUnavailable, match="bf16"):
            call()
    with mk.use_backend("triton"), torch.autocast("cpu", dtype=torch.bfloat16), \
            pytest.raises(mk.BackendUnavailable, match="bf16"):
        mk.match(tokens(), 2)  # fp32 tokens, but autocast would run the kernel's dots in bf16
    with mk.use_backend("auto"):  # auto runs the reference on CPU
        with mk.use_backend("reference"):
            want = mk.match(x, 2)
        assert torch.equal(mk.match(x, 2), want)


# ---------------------------------------------------------------------------
# tokens_to_remove (pure Python, one implementation)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(r=NAN), ValueError, "r must be >= 0 and finite"),
    (dict(r=INF), ValueError, "r must be >= 0 and finite"),
    (dict(r=16, num_protected=1.5), TypeError, "num_protected must be an int"),
    (dict(r=16, num_protected=True), TypeError, "num_protected must be an int"),
    (dict(r=16, num_tokens=197.0), TypeError, "num_tokens must be an int"),
])
def test_tokens_to_remove_refuses_nonsense(kwargs, error, match):
    kwargs = {"num_tokens": 197, **kwargs}
    with pytest.raises(error, match=match):
        mk.tokens_to_remove(**kwargs)
    assert math.isfinite(mk.tokens_to_remove(197, 16))
