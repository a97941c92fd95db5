"""The merge kernel's two inference epilogues (docs/algorithm.md, "One-step-ahead attention"):

- ``MergeNorm(..., at_tokens=True)``: LayerNorm(x') written at the T token positions, row t
  being its slot dest[t]'s (the value projection then reads V'[dest] straight from its GEMM);
- ``residual=`` / ``residual_scale=``: x2 = x1 + gamma * rowmerge(y) and LayerNorm(x2), the
  attention residual of the block after a projection of the pre-fusion rows.

Exact where the kernel must agree bit for bit (x' unchanged by the options, the residual's
roundings applied to the kernel's own x', the token rows equal to the slot rows they copy);
otherwise against float64 with the tolerances of the other merge tests. Every check runs
with the interpreter's launch configuration and with the GPU's (``force_gpu_configs``: slot
blocks of 2-4, one 512-wide channel chunk masked to C).
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import mctf_kernels as mk
from mctf_kernels.merge import at_token_positions, merge_residual_reference, pooling_weights, segment_sum
from mctf_kernels.triton.configs import force_gpu_configs
from slot_maps import make_dest

# fp32: a few-term float32 sum is ~1e-7 off; a wrong weight, mean or variance moves results by
# ~1e-2. Half precision: one rounding of the output (2^-11 relative) dominates.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.float64: 1e-10}
GPU = pytest.mark.parametrize("gpu", (False, True), ids=("interp-config", "gpu-config"))


def _config(gpu):
    return force_gpu_configs() if gpu else contextlib.nullcontext()


def _inputs(B, T, C, dtype, device, kind="bi-1", res_dtype=None, scale_dtype=None):
    y = (2.0 * torch.randn(B, T, C, device=device) + 0.5).to(dtype)
    dest, t_out = make_dest(kind, B, T, device)
    received = torch.rand(B, T, device=device)
    size = torch.randint(1, 5, (B, T), device=device).float()
    x1 = (3.0 * torch.randn(B, t_out, C, device=device)).to(res_dtype or dtype)
    gamma = (0.1 + 0.05 * torch.randn(C, device=device)).to(scale_dtype or dtype)
    weight = (1 + 0.1 * torch.randn(C, device=device)).to(dtype)
    bias = (0.1 * torch.randn(C, device=device)).to(dtype)
    return y, dest, t_out, received, size, x1, gamma, weight, bias


def _merge64(y, dest, t_out, size, received, mode):
    """float64 row merge with the reference's (float32) weights."""
    w = pooling_weights(mode, size, received).double()
    return segment_sum(y.double() * w[..., None], dest.long(), t_out) / segment_sum(w[..., None], dest.long(), t_out)


def _assert_near(got, exact, ref, dtype):
    """|got - exact| <= max(TOL * scale, 2 |ref - exact|): ref is the eager same-dtype result."""
    err = (got.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    scale = max(1.0, exact.abs().max().item())
    assert err <= max(TOL[dtype] * scale, 2 * ref_err), (err, ref_err)


# ---------------------------------------------------------------- LayerNorm at the token positions

@GPU
@pytest.mark.parametrize("dtype,norm_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                              (torch.float32, torch.float16), (torch.float64, torch.float64)])
@pytest.mark.parametrize("mode", (0, 1, 3))
def test_norm_at_tokens(device, triton_backend, gpu, dtype, norm_dtype, mode):
    """Row t of the (B, T, C) output is, bit for bit, the per-slot LayerNorm's row dest[t];
    x' and size' are those of a merge without it; the per-slot rows are LayerNorm(x') to
    float64 within tolerance; the reference gives the same."""
    B, T, C = 2, 197, 384 if mode == 1 else 192
    y, dest, t_out, received, size, *_, weight, bias = _inputs(B, T, C, dtype, device)
    per_slot = mk.MergeNorm(weight, bias, 1e-6, norm_dtype)
    at_tokens = per_slot._replace(at_tokens=True)
    with torch.no_grad(), _config(gpu):
        got = mk.merge(y, dest, t_out, size, received, mode=mode, norm=at_tokens)
        slots = mk.merge(y, dest, t_out, size, received, mode=mode, norm=per_slot)
        plain = mk.merge(y, dest, t_out, size, received, mode=mode)
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1]) and got[2] is None
    assert got[3].shape == (B, T, C) and got[3].dtype == norm_dtype
    assert torch.equal(got[3], slots[3].gather(1, dest[:, :, None].expand(B, T, C)))
    exact = F.layer_norm(got[0].double(), (C,), weight.double(), bias.double(), 1e-6)
    _assert_near(slots[3], exact, mk.merge_norm_reference(got[0], per_slot), norm_dtype)
    with mk.use_backend("reference"):
        ref = mk.merge(y, dest, t_out, size, received, mode=mode, norm=at_tokens)
    assert ref[3].shape == (B, T, C)
    _assert_near(got[3], exact.gather(1, dest[:, :, None].expand(B, T, C)), ref[3], norm_dtype)


@GPU
def test_norm_at_tokens_max_pooling(device, triton_backend, gpu):
    """Max pooling (mode 2) keeps today's path in the model, but the option works there too."""
    B, T, C = 2, 197, 192
    y, dest, t_out, received, size, *_, weight, bias = _inputs(B, T, C, torch.float32, device)
    norm = mk.MergeNorm(weight, bias, 1e-6, torch.float32, at_tokens=True)
    with torch.no_grad(), _config(gpu):
        got = mk.merge(y, dest, t_out, size, received, mode=2, norm=norm)
        slots = mk.merge(y, dest, t_out, size, received, mode=2, norm=norm._replace(at_tokens=False))
    assert torch.equal(got[0], mk.merge_reference(y, dest, t_out, mode=2)[0])
    assert torch.equal(got[3], at_token_positions(slots[3], dest))


@GPU
def test_norm_at_tokens_577(device, triton_backend, gpu):
    """T = 577 (ViT at 384 px): many slot blocks per image, slots with several members."""
    B, T, C = 1, 577, 64
    y, dest, t_out, received, size, *_, weight, bias = _inputs(B, T, C, torch.float32, device, kind="random")
    norm = mk.MergeNorm(weight, bias, 1e-6, torch.float32, at_tokens=True)
    with torch.no_grad(), _config(gpu):
        got = mk.merge(y, dest, t_out, size, received, mode=1, norm=norm)
        slots = mk.merge(y, dest, t_out, size, received, mode=1, norm=norm._replace(at_tokens=False))
    assert torch.equal(got[3], at_token_positions(slots[3], dest))
    exact = F.layer_norm(got[0].double(), (C,), weight.double(), bias.double(), 1e-6)
    _assert_near(slots[3], exact, mk.merge_norm_reference(got[0], norm._replace(at_tokens=False)), torch.float32)


@GPU
def test_norm_at_tokens_writes_every_token_and_nothing_else(device, triton_backend, gpu):
    """Through the launcher into a window of a larger buffer: every token row of the window is
    written (tokens whose slot is outside [0, T') with zeros, by the last slot block's program),
    nothing outside it is. Out-of-range slots: negative, past T', past int32."""
    from mctf_kernels.triton.merge import launch_merge

    B, T, C, t_out = 2, 197, 100, 130  # C = 100: one chunk of 128, channels masked
    dest = torch.cat([torch.arange(t_out), torch.randint(0, t_out, (T - t_out,))]).expand(B, T).clone().to(device)
    dest[0, 150:160] = -3
    dest[1, 140:150] = t_out + 5
    dest[1, 160] = 2 ** 40
    x = torch.randn(B, T, C, device=device)
    size = torch.randint(1, 5, (B, T), device=device).float()
    received = torch.rand(B, T, device=device)
    weight, bias = 1 + 0.1 * torch.randn(C, device=device), 0.1 * torch.randn(C, device=device)
    sentinel = 7.25
    for at_tokens in (False, True):
        rows = T if at_tokens else t_out
        big = torch.full((B, rows + 2, C + 16), sentinel, device=device)
        normed = big[:, 1:rows + 1, 8:8 + C]
        with torch.no_grad(), _config(gpu):
            out, *_ = launch_merge(x, dest, t_out, size, received, 1, None, norm=(weight, bias, 1e-6, normed),
                                   norm_at_tokens=at_tokens)
        outside = torch.ones_like(big, dtype=torch.bool)
        outside[:, 1:rows + 1, 8:8 + C] = False
        assert (big[outside] == sentinel).all()
        assert (normed != sentinel).all()
        if not at_tokens:
            per_slot = normed.clone()
    keep = (dest >= 0) & (dest < t_out)
    assert (normed[~keep] == 0).all()
    assert torch.equal(normed, at_token_positions(per_slot, dest))


# ---------------------------------------------------------------- residual epilogue

EPILOGUE_DTYPES = [  # (y, residual, scale, norm output): a float32 model, a half model, autocast, float64
    (torch.float32, torch.float32, torch.float32, torch.float32),
    (torch.float16, torch.float16, torch.float16, torch.float16),
    (torch.float16, torch.float32, torch.float32, torch.float16),
    (torch.float64, torch.float64, torch.float64, torch.float64),
]


@GPU
@pytest.mark.parametrize("dtypes", EPILOGUE_DTYPES, ids=("fp32", "fp16", "autocast", "fp64"))
@pytest.mark.parametrize("mode,layer_scale", [(1, True), (1, False), (0, True), (3, False)])
def test_residual_epilogue(device, triton_backend, gpu, dtypes, mode, layer_scale):
    """x2 = x1 + gamma * rowmerge(y) equals, bit for bit, the eager ops applied to the kernel's
    own plain merge (x' in y's dtype, the product and the sum in torch's result dtypes); x2
    is near its float64 value; LayerNorm(x2) (per slot and at the tokens) near float64's."""
    y_dtype, res_dtype, scale_dtype, norm_dtype = dtypes
    B, T, C = 2, 197, 384
    y, dest, t_out, received, size, x1, gamma, weight, bias = _inputs(B, T, C, y_dtype, device,
                                                                      res_dtype=res_dtype, scale_dtype=scale_dtype)
    gamma = gamma if layer_scale else None
    norm = mk.MergeNorm(weight.to(res_dtype), bias.to(res_dtype), 1e-6, norm_dtype)
    with torch.no_grad(), _config(gpu):
        x2, new_size, new_source, n2 = mk.merge(y, dest, t_out, size, received, mode=mode, residual=x1,
                                                residual_scale=gamma, norm=norm)
        bare = mk.merge(y, dest, t_out, size, received, mode=mode, residual=x1, residual_scale=gamma)
        n2_tokens = mk.merge(y, dest, t_out, size, received, mode=mode, residual=x1, residual_scale=gamma,
                             norm=norm._replace(at_tokens=True))[3]
        plain = mk.merge(y, dest, t_out, size, received, mode=mode)
    want = merge_residual_reference(plain[0], x1, gamma)
    assert x2.dtype == want.dtype and torch.equal(x2, want)
    assert torch.equal(bare[0], x2) and len(bare) == 3 and new_source is None
    assert torch.equal(new_size, plain[1])
    assert torch.equal(n2_tokens, at_token_positions(n2, dest))
    # x2 against float64: the merge's float32 sum differs from the reference's by summation order
    with mk.use_backend("reference"):
        ref = mk.merge(y, dest, t_out, size, received, mode=mode, residual=x1, residual_scale=gamma, norm=norm)
    exact_m = _merge64(y, dest, t_out, size, received, mode)
    exact = x1.double() + (exact_m if gamma is None else gamma.double() * exact_m)
    _assert_near(x2, exact, ref[0], res_dtype if res_dtype != torch.float32 or y_dtype == torch.float32
                 else torch.float16)  # autocast: y's fp16 rounding of x' dominates
    exact_n = F.layer_norm(x2.double(), (C,), norm.weight.double(), norm.bias.double(), 1e-6)
    _assert_near(n2, exact_n, mk.merge_norm_reference(x2, norm), norm_dtype)


@GPU
@pytest.mark.parametrize("mode", (0, 1, 3))
def test_residual_epilogue_577(device, triton_backend, gpu, mode):
    B, T, C = 1, 577, 192
    y, dest, t_out, received, size, x1, gamma, weight, bias = _inputs(B, T, C, torch.float32, device, kind="random")
    norm = mk.MergeNorm(weight, bias, 1e-6, torch.float32)
    with torch.no_grad(), _config(gpu):
        x2, _s, _src, n2 = mk.merge(y, dest, t_out, size, received, mode=mode, residual=x1, residual_scale=gamma,
                                    norm=norm)
        plain = mk.merge(y, dest, t_out, size, received, mode=mode)
    assert torch.equal(x2, merge_residual_reference(plain[0], x1, gamma))
    exact_n = F.layer_norm(x2.double(), (C,), weight.double(), bias.double(), 1e-6)
    _assert_near(n2, exact_n, mk.merge_norm_reference(x2, norm), torch.float32)


@GPU
def test_epilogues_zero_weight_slots_and_nan(device, triton_backend, gpu):
    """A slot whose weights sum to 0 is its members' plain mean, as in the reference; a NaN in
    token t of y reaches x2 only at (dest[t], its channel), and the LayerNorm only in slot
    dest[t]'s row (every channel: the row's statistics), i.e. at its member tokens."""
    B, T, C = 2, 197, 192
    y, dest, t_out, received, size, x1, gamma, weight, bias = _inputs(B, T, C, torch.float32, device)
    zero_slot = dest[0, 5].item()
    received[0][dest[0] == zero_slot] = 0.0
    bad_t, bad_c = 17, 3
    y[1, bad_t, bad_c] = float("nan")
    norm = mk.MergeNorm(weight, bias, 1e-6, torch.float32, at_tokens=True)
    with torch.no_grad(), _config(gpu):
        x2, _s, _src, n2 = mk.merge(y, dest, t_out, size, received, mode=1, residual=x1, residual_scale=gamma,
                                    norm=norm)
    with mk.use_backend("reference"):
        ref = mk.merge(y, dest, t_out, size, received, mode=1, residual=x1, residual_scale=gamma, norm=norm)
    nan_x2 = torch.zeros_like(x2, dtype=torch.bool)
    nan_x2[1, dest[1, bad_t], bad_c] = True
    assert torch.equal(x2.isnan(), nan_x2) and torch.equal(ref[0].isnan(), nan_x2)
    nan_n2 = torch.zeros_like(n2, dtype=torch.bool)
    nan_n2[1][dest[1] == dest[1, bad_t]] = True
    assert torch.equal(n2.isnan(), nan_n2) and torch.equal(ref[3].isnan(), nan_n2)
    ok = ~nan_x2
    torch.testing.assert_close(x2[ok], ref[0][ok], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(n2[~nan_n2], ref[3][~nan_n2], atol=1e-4, rtol=1e-4)
    # the zero-weight slot: members' plain mean
    members = dest[0] == zero_slot
    mean = y[0, members].double().mean(0)
    want = x1[0, zero_slot].double() + gamma.double() * mean
    torch.testing.assert_close(x2[0, zero_slot].double(), want, atol=1e-5, rtol=1e-5)


def test_epilogues_one_launch_and_gradients(device, triton_backend, monkeypatch):
    """Without a gradient to compute: one merge kernel launch does the merge, the residual and
    the LayerNorm. With one: the differentiable merge, then torch ops, whose gradients reach
    y, the residual, gamma and the norm's weight as the reference's do."""
    from mctf_kernels.triton import _merge_kernel

    B, T, C = 2, 37, 64
    y, dest, t_out, received, size, x1, gamma, weight, bias = _inputs(B, T, C, torch.float32, device)
    calls = []
    kernel = _merge_kernel._merge_kernel
    monkeypatch.setattr(kernel, "run", lambda *a, _run=kernel.run, **kw: calls.append(
        tuple(kw.get(k, False) for k in ("HAS_RESIDUAL", "HAS_NORM", "NORM_AT_TOKENS"))) or _run(*a, **kw))
    norm = mk.MergeNorm(weight, bias, 1e-6, torch.float32, at_tokens=True)
    with torch.no_grad():
        nograd = mk.merge(y, dest, t_out, size, received, mode=1, residual=x1, residual_scale=gamma, norm=norm)
    leaves = [t.clone().requires_grad_(True) for t in (y, x1, gamma, weight)]
    out = mk.merge(leaves[0], dest, t_out, size, received, mode=1, residual=leaves[1], residual_scale=leaves[2],
                   norm=norm._replace(weight=leaves[3]))
    monkeypatch.undo()
    assert calls == [(True, True, True), (False, False, False)]
    torch.testing.assert_close(out[0].detach(), nograd[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[3].detach(), nograd[3], atol=1e-5, rtol=1e-5)
    (out[0].square().sum() + out[3].square().sum()).backward()
    refs = [t.clone().requires_grad_(True) for t in (y, x1, gamma, weight)]
    with mk.use_backend("reference"):
        ref = mk.merge(refs[0], dest, t_out, size, received, mode=1, residual=refs[1], residual_scale=refs[2],
                       norm=norm._replace(weight=refs[3]))
    (ref[0].square().sum() + ref[3].square().sum()).backward()
    for got, want in zip(leaves, refs):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-4, rtol=1e-4)


def test_epilogue_bad_args(device, triton_backend):
    B, T, C = 1, 9, 16
    y, dest, t_out, received, size, x1, gamma, weight, bias = _inputs(B, T, C, torch.float32, device, kind="random")
    with pytest.raises(ValueError, match="mode 2"):
        mk.merge(y, dest, t_out, size, received, mode=2, residual=x1)
    with pytest.raises(ValueError, match="residual_scale needs residual"):
        mk.merge(y, dest, t_out, size, received, residual_scale=gamma)
    with pytest.raises(ValueError, match="residual must have shape"):
        mk.merge(y, dest, t_out, size, received, residual=x1[:, 1:])
    with pytest.raises(ValueError, match="residual_scale"):
        mk.merge(y, dest, t_out, size, received, residual=x1, residual_scale=gamma[1:])
    with pytest.raises(TypeError, match="residual"):
        mk.merge(y, dest, t_out, size, received, residual=x1.long())
    with pytest.raises(TypeError, match="residual_scale must be a floating tensor"):
        mk.merge(y, dest, t_out, size, received, residual=x1, residual_scale=gamma.tolist())
    with pytest.raises(TypeError, match="at_tokens"):
        mk.merge(y, dest, t_out, size, received, norm=mk.MergeNorm(weight, bias, 1e-6, torch.float32, 1))
    with pytest.raises(ValueError, match="dest"):
        mk.merge_norm_reference(y[:, :t_out], mk.MergeNorm(weight, bias, 1e-6, torch.float32, True))


def test_epilogues_empty_batch(device, triton_backend):
    C = 8
    y = torch.randn(0, 5, C, device=device)
    dest = torch.zeros(0, 5, dtype=torch.long, device=device)
    x1 = torch.randn(0, 3, C, device=device)
    w, b = torch.ones(C, device=device), torch.zeros(C, device=device)
    out = mk.merge(y, dest, 3, mode=3, residual=x1, residual_scale=w,
                   norm=mk.MergeNorm(w, b, 1e-6, torch.float32, at_tokens=True))
    assert out[0].shape == (0, 3, C) and out[3].shape == (0, 5, C)


def test_row_chunks():
    """Whole rows as chunks of a power of two dividing C (no padded lanes), else one padded chunk."""
    from mctf_kernels.triton.configs import merge_row_chunks

    assert merge_row_chunks(384) == (128, 3) and merge_row_chunks(192) == (64, 3)
    assert merge_row_chunks(768) == (256, 3) and merge_row_chunks(1280) == (256, 5)
    assert merge_row_chunks(1024) == (1024, 1) and merge_row_chunks(64) == (64, 1)
    assert merge_row_chunks(100) == (128, 1) and merge_row_chunks(8) == (16, 1)
    assert merge_row_chunks(144) == (256, 1)  # 9 chunks of 16: more than 8
