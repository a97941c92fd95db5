"""``merge(..., norm=MergeNorm(...))``: the LayerNorm of the merged tokens (norm1 before
the value projection of a one-step-ahead block) computed in the merge kernel's own pass.

Checked against a float64 LayerNorm of the kernel's own x' (which must be bit-identical
to a merge without the norm), with the interpreter's and the GPU's launch configurations
(whole rows as 3 chunks of 128 or 64 channels at C = 384 and 192).
"""
import pytest
import torch
import torch.nn.functional as F

import mctf_kernels as mk
from slot_maps import make_dest
from mctf_kernels.triton.configs import force_gpu_configs

# fp32: a C-term fp32 sum is ~1e-6 relative off; a wrong mean or variance moves results by ~1e-2.
# Half precision: one rounding of the output (2^-11 relative) dominates.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.float64: 1e-10}


def _inputs(B, T, C, dtype, device):
    x = (2.0 * torch.randn(B, T, C, device=device) + 0.5).to(dtype)  # a non-zero mean, as in a residual stream
    dest, t_out = make_dest("bi-1", B, T, device)
    received = torch.rand(B, T, device=device)
    size = torch.randint(1, 5, (B, T), device=device).float()
    weight = (1 + 0.1 * torch.randn(C, device=device)).to(dtype)
    bias = (0.1 * torch.randn(C, device=device)).to(dtype)
    return x, dest, t_out, received, size, weight, bias


@pytest.mark.parametrize("gpu", (False, True), ids=("interp-config", "gpu-config"))
@pytest.mark.parametrize("dtype,norm_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                              (torch.float32, torch.float16), (torch.float64, torch.float64)])
@pytest.mark.parametrize("mode,C", [(1, 384), (2, 192), (0, 384), (3, 192)])
def test_merge_norm_matches_float64(device, triton_backend, gpu, dtype, norm_dtype, mode, C):
    B, T = 2, 197
    x, dest, t_out, received, size, weight, bias = _inputs(B, T, C, dtype, device)
    norm = mk.MergeNorm(weight, bias, 1e-6, norm_dtype)
    with torch.no_grad(), force_gpu_configs() if gpu else torch.no_grad():
        x_new, new_size, new_source, normed = mk.merge(x, dest, t_out, size, received, mode=mode, norm=norm)
        plain = mk.merge(x, dest, t_out, size, received, mode=mode)
    # the norm changes nothing else
    assert torch.equal(x_new, plain[0]) and torch.equal(new_size, plain[1]) and new_source is None
    assert normed.dtype == norm_dtype and normed.shape == (B, t_out, C)
    exact = F.layer_norm(x_new.double(), (C,), weight.double(), bias.double(), 1e-6)
    ref = mk.merge_norm_reference(x_new, norm)
    err = (normed.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    scale = max(1.0, exact.abs().max().item())
    assert err <= max(TOL[norm_dtype] * scale, 2 * ref_err), (err, ref_err)


def test_merge_norm_kernel_vs_layer_norm_op(device, triton_backend, monkeypatch):
    """The op layer: with gradients off the merge kernel normalises (one launch); with a
    gradient wanted, x' is normalised by torch's layer_norm and gradients reach x and the
    norm's parameters as they would through the model's own LayerNorm."""
    from mctf_kernels.triton import _merge_kernel

    B, T, C = 2, 37, 64
    x, dest, t_out, received, size, weight, bias = _inputs(B, T, C, torch.float32, device)
    calls = []
    kernel = _merge_kernel._merge_kernel
    monkeypatch.setattr(kernel, "run", lambda *a, _run=kernel.run, **kw: calls.append(kw.get("HAS_NORM")) or _run(*a, **kw))
    with torch.no_grad():
        nograd = mk.merge(x, dest, t_out, size, received, mode=1, norm=mk.MergeNorm(weight, bias, 1e-6,
                                                                                    torch.float32))[3]
    x_ = x.clone().requires_grad_(True)
    w_ = weight.clone().requires_grad_(True)
    out = mk.merge(x_, dest, t_out, size, received, mode=1, norm=mk.MergeNorm(w_, bias, 1e-6, torch.float32))
    monkeypatch.undo()
    assert calls == [True, False]
    torch.testing.assert_close(out[3].detach(), nograd, atol=1e-5, rtol=1e-5)
    out[3].square().sum().backward()
    x_r = x.clone().requires_grad_(True)
    w_r = weight.clone().requires_grad_(True)
    with mk.use_backend("reference"):
        ref = mk.merge(x_r, dest, t_out, size, received, mode=1, norm=mk.MergeNorm(w_r, bias, 1e-6, torch.float32))
    ref[3].square().sum().backward()
    torch.testing.assert_close(x_.grad, x_r.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w_.grad, w_r.grad, atol=1e-4, rtol=1e-4)


def test_merge_norm_bad_args(device, triton_backend):
    B, T, C = 1, 9, 16
    x, dest, t_out, received, size, weight, bias = _inputs(B, T, C, torch.float32, device)
    with pytest.raises(TypeError, match="MergeNorm"):
        mk.merge(x, dest, t_out, size, received, norm=(weight, bias, 1e-6, torch.float32))
    with pytest.raises(ValueError, match="norm.weight"):
        mk.merge(x, dest, t_out, size, received, norm=mk.MergeNorm(weight[:-1], bias, 1e-6, torch.float32))
    with pytest.raises(ValueError, match="norm.eps"):
        mk.merge(x, dest, t_out, size, received, norm=mk.MergeNorm(weight, bias, float("nan"), torch.float32))
    with pytest.raises(ValueError, match="norm.dtype"):
        mk.merge(x, dest, t_out, size, received, norm=mk.MergeNorm(weight, bias, 1e-6, torch.int32))


def test_merge_norm_with_sources(device, triton_backend):
    """Source tracing (the model's trace_source) with the folded norm: the same sources,
    tokens and sizes as a merge without it, with the GPU configuration."""
    B, T, C = 2, 197, 384
    x, dest, t_out, received, size, weight, bias = _inputs(B, T, C, torch.float32, device)
    source = torch.eye(T, device=device).expand(B, T, T)
    with torch.no_grad(), force_gpu_configs():
        got = mk.merge(x, dest, t_out, size, received, mode=1, source=source,
                       norm=mk.MergeNorm(weight, bias, 1e-6, torch.float32))
        plain = mk.merge(x, dest, t_out, size, received, mode=1, source=source)
    assert all(torch.equal(a, b) for a, b in zip(got[:3], plain))
    exact = F.layer_norm(got[0].double(), (C,), weight.double(), bias.double(), 1e-6)
    assert (got[3].double() - exact).abs().max().item() <= TOL[torch.float32] * max(1.0, exact.abs().max().item())


@pytest.mark.parametrize("gpu", (False, True), ids=("interp-config", "gpu-config"))
def test_grouped_rows_in_either_layout(device, triton_backend, gpu):
    """The row merge of the one-step-ahead output reads the attention's (B, H, T, D) result
    as (B, T, H, D) rows of H * D channels (GROUP_C), whichever layout the attention
    backend chose (BHTD on CPU, BTHD from the GPU's fused kernels): bit-identical to
    merging the same rows made contiguous, written into the caller's (B, T', H, D) out."""
    from mctf_kernels.triton.merge import launch_merge

    B, T, H, D = 2, 197, 6, 48
    dest, t_out = make_dest("bi-1", B, T, device)
    received = torch.rand(B, T, device=device)
    size = torch.randint(1, 5, (B, T), device=device).float()
    rows = torch.randn(B, T, H, D, device=device, dtype=torch.float16)
    with torch.no_grad(), force_gpu_configs() if gpu else torch.no_grad():
        want = launch_merge(rows.reshape(B, T, H * D), dest, t_out, size, received, 1, None)
        for layout in (rows, rows.transpose(1, 2).contiguous().transpose(1, 2)):  # BTHD, then BHTD storage
            out = torch.empty(B, t_out, H, D, device=device, dtype=rows.dtype)
            got = launch_merge(layout, dest, t_out, size, received, 1, None, out=out.view(B, t_out, H * D),
                               grouped=True)
            assert torch.equal(out.view(B, t_out, H * D), want[0]) and torch.equal(got[3], want[3])


@pytest.mark.parametrize("sms,block_s", [(132, 2), (20, 4)])
def test_merge_norm_slots_per_program(device, triton_backend, monkeypatch, sms, block_s):
    """The GPU policy's slots per program (2 below one program per SM, else 4; SMs
    patched to reach each at B = 2) give bit-identical
    tokens, sizes and normed rows: every slot's row is reduced on its own."""
    from mctf_kernels.triton import configs

    B, T, C = 2, 197, 384
    x, dest, t_out, received, size, weight, bias = _inputs(B, T, C, torch.float16, device)
    norm = mk.MergeNorm(weight, bias, 1e-6, torch.float16)
    with torch.no_grad():
        want = mk.merge(x, dest, t_out, size, received, mode=1, norm=norm)
        monkeypatch.setattr(configs, "sm_count", lambda device: sms)
        with force_gpu_configs():
            assert configs.merge_config(x.device, B, T, t_out, C, 0, whole_rows=True)["BLOCK_S"] == block_s
            got = mk.merge(x, dest, t_out, size, received, mode=1, norm=norm)
    assert all(torch.equal(a, b) for a, b in zip(got[:2], want[:2])) and got[2] is None
    assert torch.equal(got[3], want[3])
