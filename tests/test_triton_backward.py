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


def test_merge_backward_half(device, triton_backend):
    """float16 tokens: the gradient is computed in float32 and rounded once to float16."""
    B, T, C = 2, 197, 64
    dest, t_out = make_dest("bi-1", B, T, device)
    x, size, attn = _merge_inputs(B, T, C, device, torch.float16)
    x.requires_grad_(True)
    out = mk.merge(x, dest, t_out, size, attn, mode=1)[0]
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, g)
    x32 = x.detach().float().requires_grad_(True)
    (want,) = torch.autograd.grad(mk.merge_reference(x32, dest, t_out, size, attn, mode=1)[0], x32, g.float())
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, atol=1e-3, rtol=1e-3)
