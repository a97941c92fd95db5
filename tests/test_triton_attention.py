"""Triton ``attention_received`` and ``fused_attention_output`` against the eager
references (docs/algorithm.md, "One-step-ahead attention"). CPU: a subset under
TRITON_INTERPRET=1, also with the GPU launch configurations."""
import itertools

import pytest
import torch

import mctf_kernels as mk
from slot_maps import make_dest
from mctf_kernels import ops
from mctf_kernels.triton import LAUNCHERS
from mctf_kernels.merge import pooling_weights, segment_sum
from mctf_kernels.triton.configs import force_gpu_configs
from mctf_kernels.triton.slots import slot_index

ON_CUDA = torch.cuda.is_available()

if ON_CUDA:
    SHAPES = list(itertools.product((1, 3), (5, 196, 197, 577, 1370)))  # (B, T)
    HEAD_DIMS = (48, 64, 128)
    DTYPES = (torch.float32, torch.float16, torch.bfloat16)
else:
    SHAPES = [(1, 5), (3, 196), (1, 197), (1, 577)]
    HEAD_DIMS = (64,)
    DTYPES = (torch.float32,)
H = 3
MAPS = ("bi-1", "uni-0", "bi-2", "random")
# Outputs are O(1) weighted averages of V rows: fp32 sums over T terms are ~1e-6
# off; fp16/bf16 are dominated by rounding P to V's dtype and the output
# (2^-11, 2^-8 relative), and the eager reference also rounds P @ V'[dest].
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_attn(B, T, dtype, device):
    return torch.softmax(3 * torch.randn(B, H, T, T, device=device), dim=-1).to(dtype)


def fused_truth(attn, v, dest, t_out, size, attn_received, mode):
    """float64 rowmerge(P @ V'[dest]) with the reference's float32 weights and operand rounding."""
    B, _, T, _ = attn.shape
    if size is None:
        size = torch.ones(B, T, device=attn.device)
    w = pooling_weights(mode, size, attn_received).double()
    dest = dest.long()
    v64 = v.double()
    per_query = attn.to(v.dtype).double() @ v64.gather(2, dest[:, None, :, None].expand(-1, H, -1, v.shape[-1]))
    num = segment_sum(per_query * w[:, None, :, None], dest, t_out)
    return num / segment_sum(w[:, :, None], dest, t_out)[:, None]


def assert_close(out, ref, exact, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    err = (out.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    scale = max(1.0, exact.abs().max().item())
    assert err <= max(TOL[dtype] * scale, 2 * ref_err), (err, ref_err)


@pytest.mark.parametrize("B,T", SHAPES)
def test_attention_received(device, triton_backend, B, T):
    for dtype in DTYPES:
        attn = make_attn(B, T, dtype, device)
        out = mk.attention_received(attn)
        assert out.dtype == torch.float32 and out.shape == (B, T)
        # A mean of probabilities; fp32 partial sums are ~1e-7 relative off.
        torch.testing.assert_close(out.double(), attn.double().mean(dim=(1, 2)), atol=1e-6, rtol=1e-5)
        assert torch.equal(out, mk.attention_received(attn))  # deterministic


def test_attention_received_strided_and_grad(device, triton_backend):
    B, T = 2, 197
    base = make_attn(B, T, torch.float32, device).transpose(0, 1)  # (H, B, T, T)
    for attn in (base.transpose(0, 1), base.transpose(0, 1).transpose(-1, -2)):  # strided batch; strided keys
        torch.testing.assert_close(mk.attention_received(attn), mk.attention_received_reference(attn.contiguous()))
    attn = base.transpose(0, 1).clone().requires_grad_(True)
    g = torch.randn(B, T, device=device)
    (grad,) = torch.autograd.grad(mk.attention_received(attn), attn, g)
    (grad_ref,) = torch.autograd.grad(mk.attention_received_reference(attn), attn, g)
    torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize("mode", (0, 1, 3))
@pytest.mark.parametrize("B,T", SHAPES)
def test_fused_attention_output_matches_reference(device, triton_backend, B, T, mode):
    kinds = MAPS if ON_CUDA else [MAPS[(mode + T + j) % 4] for j in (0, 2)]
    for i, (kind, D, dtype) in enumerate(itertools.product(kinds, HEAD_DIMS, DTYPES)):
        dest, t_out = make_dest(kind, B, T, device)
        attn = make_attn(B, T, torch.float32 if i % 2 else dtype, device)  # P may stay fp32 under autocast
        v = torch.randn(B, H, t_out, D, device=device, dtype=dtype)
        size = torch.randint(1, 5, (B, T), device=device).float() if i % 2 == 0 else None
        attn_received = attn.float().mean(dim=(1, 2))
        out = mk.fused_attention_output(attn, v, dest, t_out, size, attn_received, mode=mode)
        ref = mk.fused_attention_output_reference(attn, v, dest, t_out, size, attn_received, mode=mode)
        assert_close(out, ref, fused_truth(attn, v, dest, t_out, size, attn_received, mode), dtype)


@pytest.mark.parametrize("mode", (0, 1, 3))
def test_fused_attention_output_grad(device, triton_backend, mode):
    B, T, D = 2, 197, 64
    dest, t_out = make_dest("bi-1", B, T, device)
    attn = make_attn(B, T, torch.float32, device).requires_grad_(True)
    v = torch.randn(B, H, t_out, D, device=device, requires_grad=True)
    size = torch.randint(1, 5, (B, T), device=device).float()
    attn_received = attn.detach().mean(dim=(1, 2))
    out = mk.fused_attention_output(attn, v, dest, t_out, size, attn_received, mode=mode)
    ref = mk.fused_attention_output_reference(attn, v, dest, t_out, size, attn_received, mode=mode)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (attn, v), g)
    grads_ref = torch.autograd.grad(ref, (attn, v), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fused_attention_output_gradcheck(device, triton_backend):
    B, T, D = 1, 6, 16
    dest = torch.tensor([[0, 1, 1, 2, 3, 0]], device=device)
    attn = torch.softmax(torch.randn(B, H, T, T, device=device, dtype=torch.float64), -1).requires_grad_(True)
    v = torch.randn(B, H, 4, D, device=device, dtype=torch.float64, requires_grad=True)
    size, attn_received = torch.rand(B, T, device=device) + 0.5, torch.rand(B, T, device=device)
    assert torch.autograd.gradcheck(
        lambda a, v: mk.fused_attention_output(a, v, dest, 4, size, attn_received, mode=1), (attn, v), fast_mode=True
    )


def test_fused_attention_output_non_contiguous(device, triton_backend):
    B, T, D = 2, 197, 64
    dest, t_out = make_dest("bi-1", B, T, device)
    attn = make_attn(B, T, torch.float32, device).transpose(0, 1).contiguous().transpose(0, 1)  # strided batch
    qkv = torch.randn(B, t_out, 3, H, D, device=device)
    v = qkv[:, :, 2].transpose(1, 2)  # (B, H, T', D) view, as timm slices qkv
    size = torch.randint(1, 5, (T, B), device=device).float().t()
    attn_received = attn.mean(dim=(1, 2))
    for a in (attn, attn.transpose(-1, -2).contiguous().transpose(-1, -2)):  # last dim strided too
        out = mk.fused_attention_output(a, v, dest.t().contiguous().t(), t_out, size, attn_received, mode=1)
        ref = mk.fused_attention_output_reference(a.contiguous(), v.contiguous(), dest, t_out, size.contiguous(),
                                                  attn_received, mode=1)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
        assert torch.equal(out, mk.fused_attention_output(a, v, dest, t_out, size, attn_received, mode=1))


def test_fused_attention_output_runs_the_kernel(device, triton_backend, monkeypatch):
    from mctf_kernels.triton import _attention_kernel

    calls = []
    for name in ("_fused_attention_output_kernel", "_attention_received_kernel"):
        kernel = getattr(_attention_kernel, name)
        monkeypatch.setattr(kernel, "run", lambda *a, _run=kernel.run, _n=name, **k: calls.append(_n) or _run(*a, **k))
    monkeypatch.setattr(ops, "fused_attention_output_reference", None)
    monkeypatch.setattr(ops, "attention_received_reference", None)
    attn = make_attn(1, 5, torch.float32, device)
    dest = torch.tensor([[0, 1, 1, 2, 0]], device=device)
    mk.fused_attention_output(attn, torch.randn(1, H, 3, 16, device=device), dest, 3, None,
                              mk.attention_received(attn), mode=1)
    assert calls == ["_attention_received_kernel", "_fused_attention_output_kernel"]


def test_fused_attention_output_max_pooling_has_no_kernel(device, triton_backend):
    attn = make_attn(1, 5, torch.float32, device)
    dest = torch.tensor([[0, 1, 1, 2, 0]], device=device)
    with pytest.raises(mk.BackendUnavailable, match="max pooling"):
        mk.fused_attention_output(attn, torch.randn(1, H, 3, 16, device=device), dest, 3, mode=2)


@pytest.mark.parametrize("T,dtype,mode,kind", [(197, torch.float32, 1, "bi-1"), (197, torch.float16, 0, "random"),
                                               (577, torch.float32, 3, "random"), (577, torch.float16, 1, "uni-0")])
def test_fused_attention_output_gpu_configs(device, triton_backend, T, dtype, mode, kind):
    """P' @ V' from a formed P with the GPU block sizes (64-row query tiles in slot order,
    64-key steps, the overhang of a tile's last slot), against float64; deterministic;
    a precomputed slot index gives the same bits."""
    B, D = 1, 64
    dest, t_out = make_dest(kind, B, T, device)
    attn = make_attn(B, T, dtype, device)
    v = torch.randn(B, H, t_out, D, device=device, dtype=dtype)
    size = torch.randint(1, 5, (B, T), device=device).float()
    received = attn.float().mean(dim=(1, 2))
    with force_gpu_configs():
        out = mk.fused_attention_output(attn, v, dest, t_out, size, received, mode=mode)
        again = LAUNCHERS["fused_attention_output"](attn, v, dest, t_out, size, received, mode=mode,
                                                    slots=slot_index(dest, t_out))
    ref = mk.fused_attention_output_reference(attn, v, dest, t_out, size, received, mode=mode)
    assert_close(out, ref, fused_truth(attn, v, dest, t_out, size, received, mode), dtype)
    assert torch.equal(again, out)
    assert out.transpose(1, 2).is_contiguous()  # (B, T', H, D) storage, as proj reads it


@pytest.mark.parametrize("gpu", (False, True))
def test_fused_attention_output_out_of_range_dest(device, triton_backend, gpu):
    """dest values T', 10**6, -1 and -10**6: those tokens add nothing as keys or queries;
    slots left empty are NaN; nothing outside the tensors is touched."""
    B, T, D = 2, 197, 64
    dest, t_out = make_dest("bi-1", B, T, device)
    bad = dest.clone()
    bad[0, 7], bad[0, 150], bad[1, 196], bad[1, 3] = t_out, 10 ** 6, 10 ** 6, t_out
    bad[0, 60], bad[0, 0], bad[1, 100] = -1, -10 ** 6, -1
    attn = make_attn(B, T, torch.float32, device)
    v = torch.randn(B, H, t_out, D, device=device)
    with force_gpu_configs() if gpu else torch.no_grad():
        out = mk.fused_attention_output(attn, v, bad, t_out, None, None, mode=3)
    ok = (bad >= 0) & (bad < t_out)
    safe = torch.where(ok, bad, 0)
    per_query = (attn.double() * ok[:, None, None, :]) @ v.double().gather(2, safe[:, None, :, None].expand(B, H, T, D))
    onehot = ((safe[:, :, None] == torch.arange(t_out, device=device)) & ok[:, :, None]).double()  # (B, T, T')
    truth = torch.einsum("bts,bhtd->bhsd", onehot, per_query) / onehot.sum(dim=1)[:, None, :, None]
    torch.testing.assert_close(out.double(), truth, atol=2e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.skipif(not ON_CUDA, reason="torch.compile of user Triton kernels needs CUDA (fake tensors cannot run the interpreter)")
def test_attention_ops_torch_compile_fullgraph(triton_backend):
    B, T, D = 2, 197, 64
    dest, t_out = make_dest("bi-1", B, T, "cuda")
    attn = make_attn(B, T, torch.float32, "cuda").requires_grad_(True)
    v = torch.randn(B, H, t_out, D, device="cuda", requires_grad=True)
    size = torch.randint(1, 5, (B, T), device="cuda").float()

    def f(received, fused, attn, v):
        attn_received = received(attn.detach())
        return fused(attn, v, dest, t_out, size, attn_received, mode=1).square().sum()

    loss = torch.compile(f, fullgraph=True)(mk.attention_received, mk.fused_attention_output, attn, v)
    grads = torch.autograd.grad(loss, (attn, v))
    ref_loss = f(mk.attention_received_reference, mk.fused_attention_output_reference, attn, v)
    grads_ref = torch.autograd.grad(ref_loss, (attn, v))
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _groups_dest(T, groups, device):
    """dest (1, T) in token order where each (start, stop) in ``groups`` is one slot."""
    slot, dest, t = 0, [], 0
    starts = dict(groups)
    while t < T:
        stop = starts.get(t, t + 1)
        dest += [slot] * (stop - t)
        slot, t = slot + 1, stop
    return torch.tensor([dest], device=device), slot


@pytest.mark.parametrize("from_qk", (False, True), ids=("from-P", "from-qk"))
@pytest.mark.parametrize("gpu", (False, True), ids=("interp-config", "gpu-config"))
def test_fused_output_nan_rows_and_zero_weights(device, triton_backend, from_qk, gpu):
    """From P with the GPU tiles (64 query rows in slot order, a slot crossing the tile
    boundary and summed in overhang steps), and from q, k (gather + attention + the row
    merge, the model's path): a slot whose weights are all 0 is the unweighted mean
    of its members (inside a tile and across a boundary), and a NaN query row reaches only
    its own slot's output row in its own head (not the rest of its tile through the
    0/1 pooling dot), both as in the reference."""
    T, D = 197, 64
    dest, t_out = _groups_dest(T, [(10, 12), (30, 33), (60, 71), (120, 122)], device)
    q, k = torch.randn(2, 1, H, T, D, device=device).unbind(0)
    scale = D ** -0.5
    attn = torch.softmax((q * scale) @ k.transpose(-1, -2), -1)
    received = attn.mean(dim=(1, 2))
    received[0, 10:12] = 0  # zero-weight slot inside the first tile
    received[0, 60:71] = 0  # zero-weight slot across the tile boundary at row 64
    size = torch.randint(1, 5, (1, T), device=device).float()
    v = torch.randn(1, H, t_out, D, device=device)
    nan_rows = [(0, 31), (1, 66), (2, 150)]  # (head, query): slot 29; 57 (in its overhang); 136
    for h, t in nan_rows:
        (q if from_qk else attn)[0, h, t] = float("nan")
    with force_gpu_configs() if gpu else torch.no_grad():
        if from_qk:
            att = mk.fusion_attention(q, k, scale=scale)
            out = LAUNCHERS["fused_attention_output_qk"](q, k, att.lse, None, scale, v, dest, t_out, size,
                                                         received, mode=1)
            ref = mk.fused_attention_output_qk_reference(q, k, None, None, scale, v, dest, t_out, size, received,
                                                         mode=1)
        else:
            out = LAUNCHERS["fused_attention_output"](attn, v, dest, t_out, size, received, mode=1)
            ref = mk.fused_attention_output_reference(attn, v, dest, t_out, size, received, mode=1)
    expected_nan = torch.zeros(1, H, t_out, dtype=torch.bool, device=device)
    for h, t in nan_rows:
        expected_nan[0, h, dest[0, t]] = True
    assert torch.equal(ref.isnan().any(-1), expected_nan)  # the defined result
    assert torch.equal(out.isnan().all(-1), expected_nan) and torch.equal(out.isnan().any(-1), expected_nan)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5, equal_nan=True)
    assert torch.isfinite(out[0, 0, dest[0, [10, 60]]]).all()  # the zero-weight slots, where no NaN is
