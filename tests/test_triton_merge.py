"""Triton ``merge`` against the eager reference (SPEC section 5).

CPU runs a representative subset under TRITON_INTERPRET=1; CUDA runs the full grid.
Float outputs are compared with a float64 truth and allowed the larger of a
per-dtype tolerance and twice the eager same-dtype error; max pooling, sizes
and sources are exact.
"""
import itertools

import pytest
import torch

import mctf_kernels as mk
from slot_maps import make_dest
from mctf_kernels import ops
from mctf_kernels.merge import pooling_weights, segment_sum

ON_CUDA = torch.cuda.is_available()

if ON_CUDA:
    SHAPES = list(itertools.product((1, 3), (5, 196, 197, 577, 1370), (64, 192, 384, 768, 1280)))
    DTYPES = (torch.float32, torch.float16, torch.bfloat16)
else:  # the interpreter is slow: every T and C once, both batch sizes
    SHAPES = [(1, 5, 64), (3, 5, 192), (3, 196, 64), (1, 197, 384), (3, 197, 192), (1, 577, 64)]
    DTYPES = (torch.float32,)

# Slot maps: from match on random tokens ((bidirectional, num_protected)), or random.
MAPS = ("bi-1", "uni-0", "bi-2", "random")
# fp32: a few-term fp32 sum is ~1e-7 off; a wrong weight moves results by ~0.1.
# fp16/bf16: one rounding of the output (half an ulp: 2^-11, 2^-8) dominates.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-6}


def truth(x, dest, t_out, size, attn_received, mode):
    """float64 merge with the reference's (float32) weights."""
    if mode == 2:
        return mk.merge_reference(x, dest, t_out, mode=2)[0]
    B, T = dest.shape
    w = pooling_weights(mode, size if size is not None else torch.ones(B, T, device=x.device), attn_received)
    w = w.double()
    num = segment_sum(x.double() * w[..., None], dest.long(), t_out)
    return num / segment_sum(w[..., None], dest.long(), t_out)


def segment_max_nan_init(x, dest, t_out):
    """The reference's segment_max with a NaN-filled (not uninitialised) base.

    scatter_reduce(amax, include_self=False) ignores the base in the forward, but
    its backward splits the gradient among all entries equal to the max, the
    base included; the reference's ``new_empty`` base makes that depend on stale
    memory (e.g. a 0.0 there steals a share from a slot whose max is 0).
    """
    B, T = dest.shape
    index = dest.long()[:, :, None].expand_as(x)
    base = x.new_full((B, t_out, x.shape[-1]), float("nan"))
    return base.scatter_reduce(1, index, x, reduce="amax", include_self=False)


def assert_close(out, ref, exact, dtype):
    """|out - exact| <= max(TOL, 2 * |ref - exact|) elementwise-max, ref = eager same dtype."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    err = (out.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    scale = max(1.0, exact.abs().max().item())
    assert err <= max(TOL[dtype] * scale, 2 * ref_err), (err, ref_err)


def inputs(B, T, C, dtype, device, with_size, with_source):
    x = torch.randn(B, T, C, device=device, dtype=dtype)
    size = torch.randint(1, 5, (B, T), device=device).float() if with_size else None
    attn = torch.rand(B, T, device=device) + 0.05
    source = None
    if with_source:
        source = (torch.rand(B, T, 2 * T + 3, device=device) < 0.1).to(dtype)
    return x, size, attn, source


@pytest.mark.parametrize("mode", (0, 1, 2, 3))
@pytest.mark.parametrize("B,T,C", SHAPES)
def test_merge_matches_reference(device, triton_backend, B, T, C, mode):
    # CPU: two map kinds per test, rotating with mode and T so every kind meets every mode.
    kinds = MAPS if ON_CUDA else [MAPS[(mode + T + j) % 4] for j in (0, 2)]
    for i, (kind, dtype) in enumerate(itertools.product(kinds, DTYPES)):
        # Sizes and sources alternate: each mode sees size/source on and off.
        with_size, with_source = i % 2 == 0, (i + mode) % 2 == 0
        dest, t_out = make_dest(kind, B, T, device)
        x, size, attn, source = inputs(B, T, C, dtype, device, with_size, with_source)
        out, new_size, new_source = mk.merge(x, dest, t_out, size, attn, mode=mode, source=source)
        ref, ref_size, ref_source = mk.merge_reference(x, dest, t_out, size, attn, mode=mode, source=source)
        exact = truth(x, dest, t_out, size, attn, mode)
        if mode == 2:
            assert torch.equal(out, ref)
        else:
            assert_close(out, ref, exact, dtype)
        assert new_size.dtype == torch.float32 and torch.equal(new_size, ref_size)
        if with_source:
            assert torch.equal(new_source, ref_source)
        else:
            assert new_source is None


@pytest.mark.parametrize("mode", (0, 1, 2, 3))
def test_merge_grad_matches_reference(device, triton_backend, mode):
    B, T, C = 2, 197, 64
    dest, t_out = make_dest("bi-1", B, T, device)
    x, size, attn, _ = inputs(B, T, C, torch.float32, device, True, False)
    if mode == 2:  # ties: the gradient is split evenly between equal maxima
        x = torch.randint(0, 3, (B, T, C), device=device).float()
    x.requires_grad_(True)
    out = mk.merge(x, dest, t_out, size, attn, mode=mode)[0]
    if mode == 2:
        ref = segment_max_nan_init(x, dest, t_out)
    else:
        ref = mk.merge_reference(x, dest, t_out, size, attn, mode=mode)[0]
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, g)
    (grad_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", (0, 1, 2, 3))
def test_merge_gradcheck(device, triton_backend, mode):
    B, T, C = 2, 7, 3
    dest = torch.tensor([[0, 1, 1, 2, 2, 3, 0], [0, 3, 2, 1, 3, 3, 2]], device=device)
    x = torch.randn(B, T, C, device=device, dtype=torch.float64, requires_grad=True)
    if mode == 2:  # distinct values: the max is differentiable
        x = torch.randperm(B * T * C, device=device).double().view(B, T, C).requires_grad_(True)
    size, attn = torch.rand(B, T, device=device) + 0.5, torch.rand(B, T, device=device)
    assert torch.autograd.gradcheck(lambda x: mk.merge(x, dest, 4, size, attn, mode=mode)[0], (x,), fast_mode=True)


def test_merge_non_contiguous(device, triton_backend):
    B, T, C = 3, 197, 96
    dest, t_out = make_dest("bi-1", B, T, device)
    dest = dest.t().contiguous().t()  # (B, T) view with strides (1, B)
    base = torch.randn(T, B, 2 * C, device=device)
    size = (torch.randint(1, 5, (T, B), device=device).float()).t()
    attn = torch.rand(T, B, device=device).t()
    source = torch.eye(T, device=device).expand(B, T, T)  # stride 0 over the batch
    for x in (base.transpose(0, 1)[:, :, :C], base.transpose(0, 1)[:, :, ::2]):  # strided rows; strided channels
        for mode in (1, 2):
            out, new_size, new_source = mk.merge(x, dest, t_out, size, attn, mode=mode, source=source)
            ref, ref_size, ref_source = mk.merge_reference(x.contiguous(), dest.contiguous(), t_out, size.contiguous(),
                                                          attn.contiguous(), mode=mode, source=source.contiguous())
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
            assert torch.equal(new_size, ref_size) and torch.equal(new_source, ref_source)


def test_merge_deterministic(device, triton_backend):
    B, T, C = 3, 577 if ON_CUDA else 197, 384
    dest, t_out = make_dest("bi-1", B, T, device)
    x, size, attn, source = inputs(B, T, C, torch.float32, device, True, True)
    first = mk.merge(x, dest, t_out, size, attn, mode=1, source=source)
    second = mk.merge(x, dest, t_out, size, attn, mode=1, source=source)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_merge_runs_the_kernel(device, triton_backend, monkeypatch):
    from mctf_kernels.triton import _merge_kernel

    calls = []
    kernel = _merge_kernel._merge_kernel
    run = kernel.run
    monkeypatch.setattr(kernel, "run", lambda *a, **k: calls.append(1) or run(*a, **k))
    monkeypatch.setattr(ops, "merge_reference", None)  # calling the reference would fail
    x = torch.randn(1, 5, 16, device=device)
    mk.merge(x, torch.tensor([[0, 1, 1, 2, 0]], device=device), 3, mode=3)
    assert calls == [1]


def test_merge_errors(device, triton_backend):
    x = torch.randn(1, 5, 16, device=device)
    dest = torch.tensor([[0, 1, 1, 2, 0]], device=device)
    with pytest.raises(ValueError, match="attn_received"):
        mk.merge(x, dest, 3, mode=1)
    with pytest.raises(ValueError, match="source"):
        mk.merge(x, dest, 3, mode=3, source=torch.ones(1, 4, 5, device=device))


@pytest.mark.skipif(not ON_CUDA, reason="torch.compile of user Triton kernels needs CUDA (fake tensors cannot run the interpreter)")
def test_merge_torch_compile_fullgraph(triton_backend):
    B, T, C = 2, 197, 192
    dest, t_out = make_dest("bi-1", B, T, "cuda")
    x, size, attn, source = inputs(B, T, C, torch.float32, "cuda", True, True)
    x.requires_grad_(True)

    def f(merge, x):
        out, new_size, new_source = merge(x, dest, t_out, size, attn, mode=1, source=source)
        return out.square().sum(), new_size, new_source

    loss, new_size, new_source = torch.compile(f, fullgraph=True)(mk.merge, x)
    (grad,) = torch.autograd.grad(loss, x)
    ref_loss, ref_size, ref_source = f(mk.merge_reference, x)
    (ref_grad,) = torch.autograd.grad(ref_loss, x)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    assert torch.equal(new_size, ref_size) and torch.equal(new_source, ref_source)
