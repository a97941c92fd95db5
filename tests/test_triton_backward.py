"""Triton backward kernels against the references' autograd (docs/algorithm.md, "Pooling" and
"One-step-ahead attention"): the merge's ``_merge_backward_kernel``, and fp64 gradchecks of
the Triton ops through the interpreter.

CPU: small shapes under TRITON_INTERPRET=1, with the interpreter's launch configurations
and again with the GPU's (``force_gpu_configs()``: the GPU token blocks, channel steps
and splits). Degenerate inputs: a slot whose weights sum to 0, tokens in no slot, and
the pooling weights' inputs (size, attn_received), which the reference does not
differentiate (it computes the weights under no_grad): neither does the kernel.
"""
import contextlib

import pytest
import torch

import mctf_kernels as mk
from slot_maps import make_dest
from mctf_kernels.merge import merge_tokens_reference, pooling_weights
from mctf_kernels.triton import LAUNCHERS
from mctf_kernels.triton.configs import force_gpu_configs
from mctf_kernels.triton.merge import launch_merge, launch_merge_backward

pytestmark = pytest.mark.slow  # the interpreter runs every kernel here

ON_CUDA = torch.cuda.is_available()


def _configs(gpu: bool):
    return force_gpu_configs() if gpu else contextlib.nullcontext()


def _merge_inputs(B, T, C, device, dtype=torch.float32):
    x = torch.randn(B, T, C, device=device, dtype=dtype)
    size = torch.randint(1, 5, (B, T), device=device).float()
    attn = torch.rand(B, T, device=device) + 0.05
    return x, size, attn


def _ties(B, T, C, device, dtype=torch.float32):
    """Small integers: many exact ties inside a slot (max pooling splits the gradient)."""
    return torch.randint(0, 3, (B, T, C), device=device).to(dtype)


def _max_reference(x, dest, t_out):
    # NaN base (as mctf_kernels.merge.segment_max): only real members share a tie's gradient
    index = dest.long()[:, :, None].expand_as(x)
    base = x.new_full((x.shape[0], t_out, x.shape[-1]), float("nan"))
    return base.scatter_reduce(1, index, x, reduce="amax", include_self=False)


# ---------------------------------------------------------------- merge

@pytest.mark.parametrize("gpu", (False, True), ids=("interp-config", "gpu-config"))
@pytest.mark.parametrize("mode", (0, 1, 2, 3))
def test_merge_backward_matches_reference(device, triton_backend, mode, gpu):
    """Every mode, with and without a precomputed slot index, sizes on and off, C not a
    multiple of the channel block (100) and a multiple (384, split at batch 1)."""
    for (B, T, C), kind, with_size in (((2, 197, 100), "bi-1", True), ((1, 197, 384), "random", False)):
        dest, t_out = make_dest(kind, B, T, device)
        x, size, attn = _merge_inputs(B, T, C, device)
        if mode == 2:
            x = _ties(B, T, C, device)
        size = size if with_size else None
        x.requires_grad_(True)
        ref = _max_reference(x, dest, t_out) if mode == 2 else mk.merge_reference(x, dest, t_out, size, attn,
                                                                                  mode=mode)[0]
        g = torch.randn_like(ref)
        (want,) = torch.autograd.grad(ref, x, g)
        for slots in (None, mk.slot_index(dest, t_out)):
            with _configs(gpu):
                out = mk.merge(x, dest, t_out, size, attn, mode=mode, slots=slots)[0]
                (got,) = torch.autograd.grad(out, x, g)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        if mode == 2:  # ties really are split: some gradients are fractions of g
            assert ((got != 0) & (got.abs() < (g.abs().amax() + 1))).any()


@pytest.mark.parametrize("gpu", (False, True), ids=("interp-config", "gpu-config"))
def test_max_pooling_backward_nan_member(device, triton_backend, gpu):
    """A NaN member makes its slot's maximum NaN in that channel; the reference's amax
    backward then gives every member of that slot NaN there (0 * g / 0 ties), and the
    kernel must agree: NaN in those places, the reference's values everywhere else."""
    dest = torch.tensor([[0, 1, 0, 2, 1, 3, 2, 3]], device=device)
    x = torch.randn(1, 8, 4, device=device)
    x[0, 2, 1] = float("nan")
    x.requires_grad_(True)
    g = torch.randn(1, 4, 4, device=device)
    (want,) = torch.autograd.grad(mk.merge_reference(x, dest, 4, mode=2)[0], x, g)
    with _configs(gpu):
        (got,) = torch.autograd.grad(mk.merge(x, dest, 4, mode=2)[0], x, g)
    assert want[0, [0, 2], 1].isnan().all()  # the case this test is about
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("gpu", (False, True), ids=("interp-config", "gpu-config"))
@pytest.mark.parametrize("mode", (0, 1, 2, 3))
def test_merge_gradcheck_fp64(device, triton_backend, mode, gpu):
    """fp64 gradcheck (numerical derivative of the Triton forward against the Triton backward,
    along random directions: ``fast_mode``, ~1 s per case under the interpreter against ~20 s
    for the full Jacobian), with a zero-weight slot in mode 1 (slot 1 of image 0: its members
    received 0)."""
    B, T, C = 2, 9, 5
    dest = torch.tensor([[0, 1, 1, 2, 2, 3, 0, 4, 1], [0, 3, 2, 1, 3, 3, 2, 4, 4]], device=device)
    if mode == 2:  # distinct values: the max is differentiable
        x = torch.randperm(B * T * C, device=device).double().view(B, T, C)
    else:
        x = torch.randn(B, T, C, device=device, dtype=torch.float64)
    size = torch.rand(B, T, device=device) + 0.5
    attn = torch.rand(B, T, device=device)
    attn[0, dest[0] == 1] = 0.0
    x.requires_grad_(True)
    with _configs(gpu):
        assert torch.autograd.gradcheck(lambda x: mk.merge(x, dest, 5, size, attn, mode=mode)[0], (x,),
                                             fast_mode=True, atol=1e-9, rtol=1e-7)  # linear in x: tight


@pytest.mark.parametrize("gpu", (False, True), ids=("interp-config", "gpu-config"))
def test_merge_backward_fp64_uses_the_forward_weight_sums(device, triton_backend, gpu):
    """float64 x: the forward keeps its slot weight sums in float64 and the backward divides by
    those, so gradients equal the reference's to float64 rounding (a float32 copy of the sums
    was off by ~4e-8), and a slot whose weights sum to a float64 value that is 0 in float32
    is still weighted, in both directions."""
    B, T, C, t_out = 2, 37, 16, 20
    gen = torch.Generator().manual_seed(0)
    dest = torch.cat([torch.arange(t_out), torch.randint(0, t_out, (T - t_out,), generator=gen)]).expand(B, T)
    dest = dest.contiguous().to(device)
    x = torch.randn(B, T, C, dtype=torch.float64, generator=gen).to(device)
    size = torch.randint(1, 5, (B, T), generator=gen).float().to(device)
    attn = (torch.rand(B, T, generator=gen) * 1e-3 + 1 / 3).to(device)
    attn[0, dest[0] == 3] = 1e-60  # weights below float32's range, but not 0 in float64
    g = torch.randn(B, t_out, C, dtype=torch.float64, generator=gen).to(device)
    grads = {}
    for backend in ("triton", "reference"):
        xx = x.clone().requires_grad_(True)
        with mk.use_backend(backend), _configs(gpu):
            (mk.merge(xx, dest, t_out, size, attn, mode=1)[0] * g).sum().backward()
        grads[backend] = xx.grad
    torch.testing.assert_close(grads["triton"], grads["reference"], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("gpu", (False, True), ids=("interp-config", "gpu-config"))
def test_merge_backward_zero_weight_slot(device, triton_backend, gpu):
    """A slot whose weights sum to exactly 0 is the unweighted mean of its members: each
    member gets 1/count of the slot's gradient (mode 1: members received no attention;
    mode 0: zero sizes)."""
    B, T, C = 2, 197, 64
    dest, t_out = make_dest("bi-1", B, T, device)
    x, size, attn = _merge_inputs(B, T, C, device)
    counts = torch.zeros(B, t_out, device=device).scatter_add(1, dest, torch.ones(B, T, device=device))
    slot = int(counts[0].argmax())  # a multi-member slot
    assert counts[0, slot] > 1
    attn[0, dest[0] == slot] = 0.0
    size0 = size.clone()
    size0[1, dest[1] == int(counts[1].argmax())] = 0.0
    x.requires_grad_(True)
    for mode, s in ((1, size), (0, size0)):
        ref = mk.merge_reference(x, dest, t_out, s, attn, mode=mode)[0]
        g = torch.randn_like(ref)
        (want,) = torch.autograd.grad(ref, x, g)
        with _configs(gpu):
            (got,) = torch.autograd.grad(mk.merge(x, dest, t_out, s, attn, mode=mode)[0], x, g)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # mode 1's zero-attention slot: an even split
    members = dest[0] == slot
    ref = mk.merge_reference(x, dest, t_out, size, attn, mode=1)[0]
    g = torch.randn_like(ref)
    with _configs(gpu):
        (got,) = torch.autograd.grad(mk.merge(x, dest, t_out, size, attn, mode=1)[0], x, g)
    torch.testing.assert_close(got[0, members], (g[0, slot] / counts[0, slot]).expand(int(members.sum()), C))


@pytest.mark.parametrize("gpu", (False, True), ids=("interp-config", "gpu-config"))
@pytest.mark.parametrize("mode", (1, 2))
def test_merge_backward_out_of_range_dest(device, triton_backend, mode, gpu):
    """Tokens with a slot outside [0, T') are in no slot: gradient exactly 0; the others
    get the reference's gradient of the merge of the kept tokens."""
    B, T, C, t_out = 2, 197, 64, 130
    dest = torch.cat([torch.arange(t_out), torch.randint(0, t_out, (T - t_out,))]).expand(B, T).clone().to(device)
    dest[0, 150:160] = -3
    dest[1, 140:150] = t_out + 5
    dest[1, 160] = 2 ** 40
    x, size, attn = _merge_inputs(B, T, C, device)
    if mode == 2:
        x = _ties(B, T, C, device)
    x.requires_grad_(True)
    with _configs(gpu):
        out = mk.merge(x, dest, t_out, size, attn, mode=mode)[0]
        g = torch.randn_like(out)
        (got,) = torch.autograd.grad(out, x, g)
    for b in range(B):
        keep = (dest[b] >= 0) & (dest[b] < t_out)
        assert torch.equal(got[b, ~keep], torch.zeros_like(got[b, ~keep]))
        xk = x[b:b + 1, keep].detach().requires_grad_(True)
        if mode == 2:
            ref = _max_reference(xk, dest[b:b + 1, keep], t_out)
        else:  # the weights' size maximum is over the row's tokens, kept or not
            w = pooling_weights(1, size[b:b + 1], attn[b:b + 1])[:, keep]
            ref = merge_tokens_reference(xk, dest[b:b + 1, keep], t_out, w)
        (want,) = torch.autograd.grad(ref, xk, g[b:b + 1])
        torch.testing.assert_close(got[b:b + 1, keep], want, atol=1e-6, rtol=1e-5)


def test_merge_backward_weights_carry_no_gradient(device, triton_backend):
    """size and attn_received get no gradient from the reference (weights under no_grad);
    the Triton op gives none either, and x's gradient is unchanged by their requires_grad."""
    B, T, C = 2, 197, 32
    dest, t_out = make_dest("bi-1", B, T, device)
    x, size, attn = _merge_inputs(B, T, C, device)
    leaves = [t.clone().requires_grad_(True) for t in (x, size, attn)]
    g = torch.randn(B, t_out, C, device=device)
    ref = mk.merge_reference(*leaves[:1], dest, t_out, leaves[1], leaves[2], mode=1)[0]
    want = torch.autograd.grad(ref, leaves, g, allow_unused=True)
    out = mk.merge(leaves[0], dest, t_out, leaves[1], leaves[2], mode=1)[0]
    got = torch.autograd.grad(out, leaves, g, allow_unused=True)
    assert want[1] is None and want[2] is None and got[1] is None and got[2] is None
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("gpu", (False, True), ids=("interp-config", "gpu-config"))
@pytest.mark.parametrize("mode", (1, 2))
def test_merge_backward_per_head_rows(device, triton_backend, mode, gpu):
    """The launcher's (B, H, T, C) form (per-head rows sharing one slot map per image)."""
    B, H, T, C = 2, 3, 77, 48
    dest, t_out = make_dest("bi-1", B, T, device)
    _x, size, attn = _merge_inputs(B, T, C, device)
    x = (_ties(B, H * T, C, device) if mode == 2 else torch.randn(B, H * T, C, device=device)).view(B, H, T, C)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)  # strided rows, unit channel stride
    with _configs(gpu):
        out, _s, _src, den = launch_merge(x, dest, t_out, size, attn, mode, None)
        g = torch.randn_like(out)
        got = launch_merge_backward(g, x, out, dest, den, size, attn, mode, x.dtype)
    xr = x.detach().clone().requires_grad_(True)
    with torch.no_grad():
        w = None if mode == 2 else pooling_weights(mode, size, attn)
    if mode == 2:
        ref = torch.stack([_max_reference(xr[:, h], dest, t_out) for h in range(H)], dim=1)
    else:
        ref = merge_tokens_reference(xr, dest, t_out, w)
    (want,) = torch.autograd.grad(ref, xr, g)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_merge_backward_half(device, triton_backend, dtype):
    """Half tokens: the gradient is computed in float32 and rounded once. bfloat16 on CUDA
    only (dispatch refuses bf16 kernels under the interpreter)."""
    if dtype == torch.bfloat16 and not ON_CUDA:
        pytest.skip("bf16 Triton kernels are refused under the interpreter: checked on CUDA")
    B, T, C = 2, 197, 64
    dest, t_out = make_dest("bi-1", B, T, device)
    x, size, attn = _merge_inputs(B, T, C, device, dtype)
    x.requires_grad_(True)
    out = mk.merge(x, dest, t_out, size, attn, mode=1)[0]
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, g)
    x32 = x.detach().float().requires_grad_(True)
    (want,) = torch.autograd.grad(mk.merge_reference(x32, dest, t_out, size, attn, mode=1)[0], x32, g.float())
    assert got.dtype == dtype
    ulp = 2.0 ** (-11 if dtype == torch.float16 else -8)  # one rounding of the result
    torch.testing.assert_close(got.float(), want, atol=1e-5, rtol=ulp)


# ---------------------------------------------------------------- one-step-ahead attention output

def _attention_inputs(B, H, T, D, device, dtype=torch.float32, with_log=True, with_size=True, kind="bi-1"):
    dest, t_out = make_dest(kind, B, T, device)
    q = (2 * torch.randn(B, H, T, D, device=device)).to(dtype)
    k = (1.5 * torch.randn(B, H, T, D, device=device)).to(dtype)
    v = torch.randn(B, H, t_out, D, device=device).to(dtype)
    ls = (1 + 4 * torch.rand(B, T, device=device)).log() if with_log else None
    size = torch.randint(1, 5, (B, T), device=device).float() if with_size else None
    received = torch.rand(B, T, device=device) + 0.05
    return q, k, v, ls, size, received, dest, t_out


def _truth_grads(q, k, v, ls, scale, dest, t_out, size, received, mode, g):
    """float64 autograd of the reference (explicit softmax) at the same operands."""
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = mk.fused_attention_output_qk_reference(leaves[0], leaves[1], None, None if ls is None else ls.double(),
                                                 scale, leaves[2], dest, t_out, size, received, mode=mode)
    return ref, torch.autograd.grad(ref, leaves, g.double())


def _triton_grads(q, k, v, ls, scale, dest, t_out, size, received, mode, g, lse=None, slots=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = LAUNCHERS["fused_attention_output_qk"](leaves[0], leaves[1], lse, ls, scale, leaves[2], dest, t_out, size, received,
                                       mode=mode, slots=slots)
    return out, torch.autograd.grad(out, leaves, g)


def _assert_grads(got, want, rel):
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == b.dtype or b.dtype == torch.float64
        torch.testing.assert_close(a.double(), b, atol=rel * b.abs().max().item(), rtol=rel, msg=name)


@pytest.mark.parametrize("gpu", (False, True), ids=("interp-config", "gpu-config"))
@pytest.mark.parametrize("mode", (0, 1, 3))
def test_attention_backward_matches_fp64(device, triton_backend, mode, gpu):
    """dq, dk, dV' against float64 autograd of the reference: T across several 32/64-key
    tiles (197) and below one tile (5), head dims that are not a power of two (48),
    with and without log_size / sizes, the slot index and lse given or computed."""
    cases = [(2, 3, 197, 48, True, True, "bi-1"), (1, 2, 5, 16, False, False, "uni-0"),
             (1, 1, 77, 64, True, False, "random")]
    for B, H, T, D, with_log, with_size, kind in cases:
        q, k, v, ls, size, received, dest, t_out = _attention_inputs(B, H, T, D, device, with_log=with_log,
                                                                    with_size=with_size, kind=kind)
        scale = D ** -0.5
        g = torch.randn(B, H, t_out, D, device=device)
        ref, want = _truth_grads(q, k, v, ls, scale, dest, t_out, size, received, mode, g)
        att = mk.fusion_attention(q, k, scale=scale, log_size=ls)
        for lse, slots in ((None, None), (att.lse, mk.slot_index(dest, t_out))):
            with _configs(gpu):
                out, got = _triton_grads(q, k, v, ls, scale, dest, t_out, size, received, mode, g, lse, slots)
            torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
            # fp32 operands, fp32 accumulation over T terms: ~1e-6 of the largest gradient
            _assert_grads(got, want, 2e-5)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_attention_backward_half(device, triton_backend, dtype):
    """Half q, k, v (tensor-core dots, fp32 accumulation): each gradient's error against the
    float64 truth is within the dtype's tolerance or twice the eager reference's own error
    in that dtype (the reference rounds logits and probabilities to it; on CPU the kernels
    are about 4x closer in float16). bfloat16 on CUDA only: the interpreter computes bf16
    ``tl.dot`` wrongly."""
    if dtype == torch.bfloat16 and not ON_CUDA:
        pytest.skip("bf16 tl.dot is wrong under the Triton interpreter: checked on CUDA")
    B, H, T, D = 2, 3, 197, 64
    q, k, v, ls, size, received, dest, t_out = _attention_inputs(B, H, T, D, device, dtype)
    scale = D ** -0.5
    g = torch.randn(B, H, t_out, D, device=device)
    _ref, want = _truth_grads(q, k, v, ls, scale, dest, t_out, size, received, 1, g)
    eager = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_half = mk.fused_attention_output_qk_reference(eager[0], eager[1], None, ls, scale, eager[2], dest, t_out,
                                                      size, received, mode=1)
    eager_grads = torch.autograd.grad(ref_half, eager, g.to(dtype))
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    for gpu in (False, True):
        with _configs(gpu):
            _out, got = _triton_grads(q, k, v, ls, scale, dest, t_out, size, received, 1, g.to(dtype))
        for name, a, e, b in zip("qkv", got, eager_grads, want):
            assert a.dtype == dtype
            top = b.abs().max().item()
            err = (a.double() - b).abs().max().item() / top
            eager_err = (e.double() - b).abs().max().item() / top
            assert err <= max(tol, 2 * eager_err), (name, gpu, err, eager_err)


def test_attention_backward_fp64_inputs(device, triton_backend):
    """float64 q, k, v: the backward accumulates in float64 (the logits are float32 in
    both passes, so ~1e-7 relative), against the reference's float64 autograd."""
    B, H, T, D = 1, 2, 70, 16
    q, k, v, ls, size, received, dest, t_out = _attention_inputs(B, H, T, D, device, torch.float64)
    g = torch.randn(B, H, t_out, D, device=device, dtype=torch.float64)
    for gpu in (False, True):
        _ref, want = _truth_grads(q, k, v, ls, D ** -0.5, dest, t_out, size, received, 1, g)
        with _configs(gpu):
            _out, got = _triton_grads(q, k, v, ls, D ** -0.5, dest, t_out, size, received, 1, g)
        assert all(t.dtype == torch.float64 for t in got)
        _assert_grads(got, want, 2e-6)


def test_attention_gradcheck_fp64(device, triton_backend):
    """fp64 gradcheck of the Triton op (numerical derivative of its forward against its
    backward). The logits are float32 in the kernels, so the step is 1e-3 (a float32
    rounding over 1e-6 would swamp the derivative) and the tolerance 1e-3."""
    B, H, T, D = 1, 2, 9, 4
    q, k, v, ls, size, received, dest, t_out = _attention_inputs(B, H, T, D, device, torch.float64)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))

    def f(q, k, v):
        return LAUNCHERS["fused_attention_output_qk"](q, k, None, ls, D ** -0.5, v, dest, t_out, size, received, mode=1)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-3, atol=1e-3, rtol=1e-3, fast_mode=True)


@pytest.mark.parametrize("gpu", (False, True), ids=("interp-config", "gpu-config"))
def test_attention_backward_degenerate(device, triton_backend, gpu):
    """A zero-weight slot (its members received no attention: an unweighted mean), a slot
    with no member (dV' = 0), queries and keys in no slot (a key in no slot still takes
    part in the softmax normaliser: its dk is not 0), against the truth computed on a
    dense formulation in float64."""
    B, H, T, D, t_out = 2, 2, 70, 16, 50
    q, k, _v, ls, size, received, _d, _t = _attention_inputs(B, H, T, D, device)
    dest = torch.cat([torch.arange(t_out), torch.randint(0, t_out, (T - t_out,))]).expand(B, T).clone().to(device)
    dest[:, 7] = dest[:, 3]  # slot 7 has no member
    dest[0, 60:64] = -1  # in no slot
    dest[1, 64] = t_out + 3
    received[0, dest[0] == 5] = 0.0  # slot 5 of image 0: weights sum to 0
    v = torch.randn(B, H, t_out, D, device=device)
    g = torch.randn(B, H, t_out, D, device=device)
    scale = D ** -0.5
    with _configs(gpu):
        _out, got = _triton_grads(q, k, v, ls, scale, dest, t_out, size, received, 1, g)
    # truth: P (fp64) from q, k; out[o] = sum_q M[o, q] (P @ V'[dest])[q], M the row-merge matrix
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    logits = (leaves[0] * scale) @ leaves[1].transpose(-1, -2) + ls.double()[:, None, None, :]
    p = logits.softmax(-1)
    in_slot = (dest >= 0) & (dest < t_out)
    onehot = (dest[:, None, :] == torch.arange(t_out, device=device)[None, :, None]).double()  # (B, T', T)
    w = pooling_weights(1, size, received).double() * in_slot
    den = onehot @ w[..., None]
    zero = (den == 0) & (onehot.sum(-1, keepdim=True) > 0)
    merge = torch.where(zero, onehot / onehot.sum(-1, keepdim=True).clamp_min(1), onehot * w[:, None, :] / den)
    merge = torch.nan_to_num(merge)  # slots with no member: a zero row
    vk = onehot.transpose(1, 2)[:, None] @ leaves[2]  # V'[dest k], 0 for keys in no slot
    ref = merge[:, None] @ (p @ vk)
    want = torch.autograd.grad(ref, leaves, g.double())
    _assert_grads(got, want, 2e-5)
    assert torch.equal(got[2][:, :, 7], torch.zeros_like(got[2][:, :, 7]))
    assert got[1][0, :, 60:64].abs().amax() > 0
    assert torch.equal(got[0][0, :, 60:64], torch.zeros_like(got[0][0, :, 60:64]))


def test_attention_backward_deterministic_and_constants(device, triton_backend):
    """Two backwards are bit-identical; size, attn_received and log_size get no gradient
    (the weights are constants of the reference; log sizes carry none in a model)."""
    B, H, T, D = 2, 2, 77, 16
    q, k, v, ls, size, received, dest, t_out = _attention_inputs(B, H, T, D, device)
    g = torch.randn(B, H, t_out, D, device=device)
    runs = [_triton_grads(q, k, v, ls, D ** -0.5, dest, t_out, size, received, 1, g)[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    consts = [t.clone().requires_grad_(True) for t in (size, received)]
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = LAUNCHERS["fused_attention_output_qk"](leaves[0], leaves[1], None, ls, D ** -0.5, leaves[2], dest, t_out,
                                       consts[0], consts[1], mode=1)
    grads = torch.autograd.grad(out, leaves + consts, g, allow_unused=True)
    assert grads[3] is None and grads[4] is None
    ref = mk.fused_attention_output_qk_reference(q, k, None, ls, D ** -0.5, v, dest, t_out, consts[0], consts[1],
                                                 mode=1)
    assert not ref.requires_grad  # the reference does not differentiate the weights either


# ---------------------------------------------------------------- a patched model's training step

@pytest.mark.parametrize("pooling,one_step_ahead", ((1, 1), (2, 0)))
def test_model_gradients_triton_equal_reference(device, pooling, one_step_ahead):
    """One training step of a tiny patched ViT (proportional attention, sizes growing over 3
    fused blocks): every parameter's gradient through the Triton backwards equals the
    reference's autograd. The presets' path (one-step-ahead attention, pooling 1) runs both
    Triton backwards; max pooling, fused after the block, the merge's."""
    import timm

    import mctf

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, embed_dim=64,
                              depth=4, num_heads=2, num_classes=5).to(device)
    with torch.no_grad():  # peaky attention, so the informativeness term matters
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4)
    mctf.patch.timm(model, mctf.MCTFConfig(r=8, layers=(1, 2, 3), pooling=pooling,
                                           one_step_ahead=one_step_ahead))
    model.train()
    x, y = torch.randn(2, 3, 64, 64, device=device), torch.tensor([0, 3], device=device)
    grads = {}
    for backend in ("reference", "triton"):
        model.zero_grad(set_to_none=True)
        with mctf.use_backend(backend):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
        assert model.mctf_state.tokens_per_block == [65, 57, 49, 41]
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["triton"].keys() == grads["reference"].keys() and len(grads["triton"]) > 10
    for name, ref in grads["reference"].items():
        scale = max(ref.abs().max().item(), 1e-6)
        torch.testing.assert_close(grads["triton"][name], ref, atol=1e-4 * scale, rtol=1e-3, msg=name)


@pytest.mark.parametrize("gpu", (False, True), ids=("interp-config", "gpu-config"))
def test_backwards_with_a_garbage_slot_index_stay_in_bounds(device, triton_backend, gpu):
    """A caller's slot index is not checked (a host sync): the backwards clamp every bound and
    member they read, as the forwards do, so wrong values give wrong numbers, never an access
    outside a tensor. Members and bounds a million rows outside [0, T] here: the interpreter
    does not check bounds, but an unclamped access that far away typically lands in unmapped
    memory and kills the process (an offset of 10**7 floats did, here), so this is a smoke
    check; the clamps themselves are the guarantee."""
    B, H, T, D = 2, 2, 77, 16
    q, k, v, ls, size, received, dest, t_out = _attention_inputs(B, H, T, D, device)
    order = torch.stack([torch.full((T,), 10 ** 6), torch.full((T,), -10 ** 6)]).to(device)
    starts = torch.randint(-10 ** 6, 10 ** 6, (B, t_out + 1), device=device)
    x = torch.randn(B, T, 32, device=device, requires_grad=True)
    with _configs(gpu):
        for mode in (1, 2):
            out = mk.merge(x, dest, t_out, size, received, mode=mode, slots=(order, starts))[0]
            (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
            assert gx.shape == x.shape
        _out, grads = _triton_grads(q, k, v, ls, D ** -0.5, dest, t_out, size, received, 1,
                                    torch.randn(B, H, t_out, D, device=device), slots=(order, starts))
    # the values are not defined (the forward's weight sums of slots no program owns are
    # never written): only that every access stayed inside its tensor, shapes included
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
