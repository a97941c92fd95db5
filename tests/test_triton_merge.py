"""Triton ``merge`` and ``slot_index`` against the eager references (docs/algorithm.md, "Pooling").

CPU runs a representative subset under TRITON_INTERPRET=1; CUDA runs the full grid.
Float outputs are compared with a float64 truth and allowed the larger of a
per-dtype tolerance and twice the eager same-dtype error; max pooling, sizes
and sources are exact.
"""
import contextlib
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


# ---------------------------------------------------------------- slot index and GPU tiling

from mctf_kernels.slots import slot_index_reference  # noqa: E402
from mctf_kernels.triton.configs import force_gpu_configs  # noqa: E402


def sort_slot_index(dest, t_out):
    """The previous launcher's slot index (stable sort + searchsorted), for in-range maps."""
    B = dest.shape[0]
    sorted_dest, order = torch.sort(dest.long(), dim=1, stable=True)
    bounds = torch.arange(t_out + 1, device=dest.device).expand(B, t_out + 1).contiguous()
    return order, torch.searchsorted(sorted_dest.contiguous(), bounds)


def adversarial_dests(T, device):
    """(name, dest, t_out): one slot for all, every token alone, reversed, ties at the ends."""
    t_half = max(1, T // 2)
    ar = torch.arange(T, device=device)
    return [
        ("one slot", torch.zeros(2, T, dtype=torch.long, device=device), 1),
        ("identity", ar.expand(2, T).contiguous(), T),
        ("reversed", (T - 1 - ar).expand(2, T).contiguous(), T),
        ("pairs", (ar // 2).expand(2, T).contiguous(), (T + 1) // 2),
        ("last slot", torch.full((2, T), t_half - 1, device=device), t_half),  # other slots empty
        ("int32", torch.randint(0, t_half, (2, T), device=device, dtype=torch.int32), t_half),
    ]


@pytest.mark.parametrize("gpu", (False, True), ids=("interp-config", "gpu-config"))
@pytest.mark.parametrize("T", (5, 197, 577))
def test_slot_index_matches_sort(device, triton_backend, T, gpu):
    cases = [("random", *make_dest("random", 3, T, device)), ("bi-1", *make_dest("bi-1", 3, T, device))]
    cases += adversarial_dests(T, device)
    with force_gpu_configs() if gpu else contextlib.nullcontext():
        for name, dest, t_out in cases:
            got = mk.slot_index(dest, t_out)
            order, starts = sort_slot_index(dest, t_out)
            assert got.order.dtype == got.starts.dtype == torch.int64
            assert torch.equal(got.order, order) and torch.equal(got.starts, starts), name
            ref = slot_index_reference(dest, t_out)
            assert torch.equal(ref.order, order) and torch.equal(ref.starts, starts), name


@pytest.mark.parametrize("gpu", (False, True), ids=("interp-config", "gpu-config"))
def test_slot_index_out_of_range(device, triton_backend, gpu):
    """Slots outside [0, T') own no token: those tokens are listed after every slot's members,
    in ascending order, and nothing is written outside order / starts."""
    B, T, t_out = 3, 197, 120
    dest = torch.randint(0, t_out, (B, T), device=device)
    dest[0, ::7] = -1
    dest[1, ::5] = t_out
    dest[2, :9] = 2 ** 40  # would wrap into range if narrowed before the check
    dest[2, -3:] = -(2 ** 62)
    with force_gpu_configs() if gpu else contextlib.nullcontext():
        got = mk.slot_index(dest, t_out)
    valid = (dest >= 0) & (dest < t_out)
    for b in range(B):
        assert torch.equal(got.order[b].sort().values, torch.arange(T, device=device))  # a permutation
        n = int(valid[b].sum())
        assert int(got.starts[b, -1]) == n and int(got.starts[b, 0]) == 0
        assert torch.equal(got.order[b, n:], torch.nonzero(~valid[b]).flatten())
        members = got.order[b, :n]
        assert valid[b, members].all()
        # within the valid tokens: the stable order by slot
        key = torch.where(valid[b], dest[b], t_out)
        assert torch.equal(got.order[b], torch.sort(key, stable=True).indices)
    ref = slot_index_reference(dest, t_out)
    assert torch.equal(got.order, ref.order) and torch.equal(got.starts, ref.starts)


GPU_SHAPES = [(2, 197, 384), (1, 577, 192), (2, 197, 100), (1, 577, 64)] if not ON_CUDA else \
    list(itertools.product((1, 4), (197, 577), (64, 100, 192, 384)))


@pytest.mark.parametrize("mode", (0, 1, 2, 3))
def test_merge_gpu_configs(device, triton_backend, mode):
    """The GPU launch configuration (slot blocks, channel steps and splits, source and size
    loops over several tiles) against the reference, sizes and sources on. CPU: two shapes
    per mode, rotating, so every shape meets two modes (the interpreter is slow)."""
    shapes = GPU_SHAPES if ON_CUDA else [GPU_SHAPES[mode % 4], GPU_SHAPES[(mode + 1) % 4]]
    for B, T, C in shapes:
        i = GPU_SHAPES.index((B, T, C))
        dest, t_out = make_dest(("bi-1", "random", "uni-0", "bi-2")[i % 4], B, T, device)
        x, size, attn, source = inputs(B, T, C, torch.float32, device, True, i % 2 == 0)
        with force_gpu_configs():
            out, new_size, new_source = mk.merge(x, dest, t_out, size, attn, mode=mode, source=source)
        ref, ref_size, ref_source = mk.merge_reference(x, dest, t_out, size, attn, mode=mode, source=source)
        if mode == 2:
            assert torch.equal(out, ref)
        else:
            assert_close(out, ref, truth(x, dest, t_out, size, attn, mode), torch.float32)
        assert torch.equal(new_size, ref_size)
        if source is not None:
            assert torch.equal(new_source, ref_source)


def test_merge_config_fills_the_gpu():
    """Grids of at least one program per H100 SM at DeiT-S shapes, batch 256 and batch 1,
    and no idle channel lanes at C = 384."""
    from mctf_kernels.triton.configs import force_gpu_configs, merge_config

    for B in (1, 256):
        with force_gpu_configs():  # the GPU policy for an H100 (132 SMs), without one
            cfg = merge_config(torch.device("cpu"), B, 197, 181, 384, 0)
        programs = B * -(-181 // cfg["BLOCK_S"]) * cfg["SPLIT_C"]
        assert programs >= 132, (B, cfg)
        assert 384 % cfg["BLOCK_C"] == 0


@pytest.mark.parametrize("gpu", (False, True), ids=("interp-config", "gpu-config"))
@pytest.mark.parametrize("mode", (0, 1, 2, 3))
def test_merge_out_of_range_dest(device, triton_backend, mode, gpu):
    """Tokens with a slot outside [0, T') are in no slot: the result is the merge of the
    other tokens (the reference rejects such maps; the kernel must not write out of bounds)."""
    B, T, C, t_out = 2, 197, 64, 130
    dest = torch.cat([torch.arange(t_out), torch.randint(0, t_out, (T - t_out,))]).expand(B, T).clone().to(device)
    dest[0, 150:160] = -3
    dest[1, 140:150] = t_out + 5
    dest[1, 160] = 2 ** 40
    x, size, attn, source = inputs(B, T, C, torch.float32, device, True, True)
    with force_gpu_configs() if gpu else contextlib.nullcontext():
        out, new_size, new_source = mk.merge(x, dest, t_out, size, attn, mode=mode, source=source)
    for b in range(B):
        keep = (dest[b] >= 0) & (dest[b] < t_out)
        ref, ref_size, ref_source = mk.merge_reference(
            x[b:b + 1, keep], dest[b:b + 1, keep], t_out, size[b:b + 1, keep], attn[b:b + 1, keep], mode=mode,
            source=source[b:b + 1, keep])
        if mode == 1:  # the weights' size maximum is over the row's tokens, kept or not
            w = pooling_weights(1, size[b:b + 1], attn[b:b + 1])[:, keep].double()
            num = segment_sum(x[b:b + 1, keep].double() * w[..., None], dest[b:b + 1, keep], t_out)
            ref = (num / segment_sum(w[..., None], dest[b:b + 1, keep], t_out)).float()
        torch.testing.assert_close(out[b:b + 1], ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(new_size[b:b + 1], ref_size) and torch.equal(new_source[b:b + 1], ref_source)


def test_merge_precomputed_slots(device, triton_backend):
    B, T, C = 2, 197, 192
    dest, t_out = make_dest("bi-1", B, T, device)
    x, size, attn, source = inputs(B, T, C, torch.float32, device, True, True)
    slots = mk.slot_index(dest, t_out)
    got = mk.merge(x, dest, t_out, size, attn, mode=1, source=source, slots=slots)
    plain = mk.merge(x, dest, t_out, size, attn, mode=1, source=source)
    for a, b in zip(got, plain):
        assert torch.equal(a, b)
    with mk.use_backend("reference"):  # the reference takes and ignores it
        ref = mk.merge(x, dest, t_out, size, attn, mode=1, source=source, slots=slots)
    torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="slots"):
        mk.merge(x, dest, t_out, size, attn, mode=1, slots=(slots.order, slots.starts[:, 1:]))
    with pytest.raises(ValueError, match="slots"):
        mk.merge(x, dest, t_out, size, attn, mode=1, slots=slots.order)


@pytest.mark.parametrize("mode", (1, 2))
def test_merge_grad_gpu_configs(device, triton_backend, mode):
    B, T, C = 2, 197, 128
    dest, t_out = make_dest("bi-1", B, T, device)
    x, size, attn, _ = inputs(B, T, C, torch.float32, device, True, False)
    if mode == 2:
        x = torch.randint(0, 3, (B, T, C), device=device).float()
    x.requires_grad_(True)
    with force_gpu_configs():
        out = mk.merge(x, dest, t_out, size, attn, mode=mode, slots=mk.slot_index(dest, t_out))[0]
    ref = segment_max_nan_init(x, dest, t_out) if mode == 2 else mk.merge_reference(x, dest, t_out, size, attn,
                                                                                      mode=mode)[0]
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0],
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("gpu", (False, True), ids=("interp-config", "gpu-config"))
def test_merge_garbage_slot_index_stays_in_bounds(device, triton_backend, gpu):
    """A precomputed slot index is not checked (a host sync): the kernel clamps what it
    reads. Members past the tokens clamp to the last (first) token, so every slot then
    pools that one row; bounds past T clamp to T. Nothing is read outside the tensors."""
    B, T, C = 2, 197, 64
    dest, t_out = make_dest("bi-1", B, T, device)
    x, size, attn, source = inputs(B, T, C, torch.float32, device, True, True)
    slots = mk.slot_index(dest, t_out)
    order = torch.stack([torch.full((T,), 10 ** 6), torch.full((T,), -10 ** 6)]).to(device)
    with force_gpu_configs() if gpu else contextlib.nullcontext():
        out, new_size, new_source = mk.merge(x, dest, t_out, size, attn, mode=3, source=source,
                                             slots=(order, slots.starts))
        count = (slots.starts[:, 1:] - slots.starts[:, :-1]).float()
        torch.testing.assert_close(out, torch.stack([x[0, T - 1], x[1, 0]])[:, None].expand(B, t_out, C))
        torch.testing.assert_close(new_size, count * torch.stack([size[0, T - 1], size[1, 0]])[:, None])
        assert torch.equal(new_source, torch.stack([source[0, T - 1], source[1, 0]])[:, None].expand_as(new_source))
        starts = torch.randint(-10 ** 6, 10 ** 6, (B, t_out + 1), device=device)
        out, new_size, _ = mk.merge(x, dest, t_out, size, attn, mode=1, slots=(slots.order, starts))
    assert out.shape == (B, t_out, C) and torch.isfinite(new_size).all() and (new_size >= 0).all()
