"""Triton flash-style one-step-ahead attention (docs/algorithm.md, "One-step-ahead attention"): ``fusion_attention``
(per-query log-sum-exp and the attention each token receives, P never formed) and
``fused_attention_output_qk`` (P' @ V' recomputing P from q, k) against float64
truths and the eager references. CPU: a subset under TRITON_INTERPRET=1 in float32
(the interpreter's bfloat16 ``tl.dot`` is broken, so half precision runs on CUDA)."""
import itertools

import pytest
import torch

import mctf_kernels as mk
from slot_maps import make_dest
from mctf_kernels import ops
from mctf_kernels.triton import LAUNCHERS
from mctf_kernels.triton.configs import force_gpu_configs
from mctf_kernels.triton.slots import slot_index

ON_CUDA = torch.cuda.is_available()

if ON_CUDA:
    SHAPES = list(itertools.product((1, 3), (5, 196, 197, 577, 1370)))  # (B, T)
    HEADS = (1, 3, 6)
    HEAD_DIMS = (16, 48, 64, 80, 128)
    DTYPES = (torch.float32, torch.float16, torch.bfloat16)
    MAPS = ("bi-1", "uni-0", "bi-2", "random")
else:  # (B, T) with one (H, D) each: the interpreter runs one numpy op per program
    SHAPES = [(1, 5), (3, 196), (1, 197), (1, 577)]
    HEADS = (1, 3, 6)
    HEAD_DIMS = (16, 48, 64)
    DTYPES = (torch.float32,)
    MAPS = ("bi-1", "uni-0", "bi-2", "random")

# Output tolerances as tests/test_triton_attention.py: fp32 sums over T terms are ~1e-6
# off; fp16/bf16 outputs are dominated by rounding P to V's dtype and the output.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def cases(B, T):
    """(H, D, dtype, with log_size) combinations for one (B, T)."""
    if ON_CUDA:
        return list(itertools.product(HEADS, HEAD_DIMS, DTYPES, (False, True)))
    i = SHAPES.index((B, T))
    return [(HEADS[i % 3], HEAD_DIMS[(i + 1) % 3], torch.float32, bool(i % 2)),
            (HEADS[(i + 1) % 3], HEAD_DIMS[i % 3], torch.float32, not i % 2)][: 1 + (T < 500)]


def make_qk(B, H, T, D, dtype, device, log_size):
    """q, k with peaky attention (logit std ~3), and log_size = log of sizes in [1, 5)."""
    q = (2 * torch.randn(B, H, T, D, device=device)).to(dtype)
    k = (1.5 * torch.randn(B, H, T, D, device=device)).to(dtype)
    ls = (1 + 4 * torch.rand(B, T, device=device)).log() if log_size else None
    return q, k, ls


def truth_logits(q, k, scale, log_size):
    """float64 logits from the operands the kernels use: q * scale rounded to q's dtype, k."""
    logits = (q * scale).double() @ k.double().transpose(-1, -2)
    return logits if log_size is None else logits + log_size.double()[:, None, None, :]


# ---------------------------------------------------------------- fusion_attention

@pytest.mark.parametrize("B,T", SHAPES)
def test_fusion_attention_matches_fp64(device, triton_backend, B, T):
    for H, D, dtype, with_log in cases(B, T):
        q, k, ls = make_qk(B, H, T, D, dtype, device, with_log)
        scale = D ** -0.5
        att = mk.fusion_attention(q, k, scale=scale, log_size=ls)
        assert att.probs is None and att.q is q and att.k is k and att.log_size is ls and att.scale == scale
        assert att.lse.dtype == att.received.dtype == torch.float32
        assert att.lse.shape == (B, H, T) and att.received.shape == (B, T)
        logits = truth_logits(q, k, scale, ls)
        lse = logits.logsumexp(dim=-1)
        received = (logits - lse[..., None]).exp().mean(dim=(1, 2))
        # The kernels compute exactly these float64 logits' operands with float32
        # accumulation (for every dtype: products of fp16/bf16 are exact in fp32), so
        # the logits are ~D * 2^-24 * |q.k| off (<~1e-5 at |s| ~ 10), and every
        # probability is that much off relatively; a mean of probabilities keeps it.
        torch.testing.assert_close(att.lse.double(), lse, atol=2e-5, rtol=2e-6)
        torch.testing.assert_close(att.received.double(), received, atol=1e-9, rtol=2e-5)
        if dtype != torch.float32:  # the eager reference rounds logits and P to the half dtype
            ref = mk.fusion_attention_reference(q, k, scale=scale, log_size=ls)
            assert (att.received.double() - received).abs().max() <= (ref.received.double() - received).abs().max()


def test_fusion_attention_strided_qkv_and_deterministic(device, triton_backend):
    """q, k as timm slices them: qkv.reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4)."""
    B, T, H, D = 2, 197, 3, 48
    qkv = 2 * torch.randn(B, T, 3 * H * D, device=device)
    q, k, _v = qkv.reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    ls = (1 + 4 * torch.rand(T, B, device=device)).log().t()  # strided log_size too
    att = mk.fusion_attention(q, k, scale=D ** -0.5, log_size=ls)
    ref = mk.fusion_attention(q.contiguous(), k.contiguous(), scale=D ** -0.5, log_size=ls.contiguous())
    torch.testing.assert_close(att.lse, ref.lse, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(att.received, ref.received, atol=1e-9, rtol=1e-6)
    # head dim strided (copied by the launcher)
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    torch.testing.assert_close(mk.fusion_attention(qt, k, scale=D ** -0.5, log_size=ls).lse, att.lse)
    again = mk.fusion_attention(q, k, scale=D ** -0.5, log_size=ls)
    assert torch.equal(again.lse, att.lse) and torch.equal(again.received, att.received)


# ---------------------------------------------------------------- fused_attention_output_qk

def output_truth(q, k, ls, scale, v, dest, t_out, size, received, mode):
    """float64 P' @ V' from the operands the kernel uses (q * scale rounded to q's dtype, k, v);
    the kernel also rounds P to v's dtype before P @ V', as the reference does."""
    return mk.fused_attention_output_qk_reference(
        (q * scale).double(), k.double(), None, None if ls is None else ls.double(), 1.0, v.double(),
        dest, t_out, size, received, mode=mode,
    )


def assert_close(out, ref, exact, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    err = (out.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    scale = max(1.0, exact.abs().max().item())
    assert err <= max(TOL[dtype] * scale, 2 * ref_err), (err, ref_err)


@pytest.mark.parametrize("mode", (0, 1, 3))
@pytest.mark.parametrize("B,T", SHAPES)
def test_fused_attention_output_qk_matches_reference(device, triton_backend, B, T, mode):
    combos = cases(B, T)
    if ON_CUDA:
        combos = [c for c in combos if c[1] in (48, 128) or c[0] == 3]
    for i, (H, D, dtype, with_log) in enumerate(combos):
        kind = MAPS[(i + mode + T) % 4]
        q, k, ls = make_qk(B, H, T, D, dtype, device, with_log)
        scale = D ** -0.5
        att = mk.fusion_attention(q, k, scale=scale, log_size=ls)
        dest, t_out = make_dest(kind, B, T, device)
        v = torch.randn(B, H, t_out, D, device=device, dtype=dtype)
        size = torch.randint(1, 5, (B, T), device=device).float() if (i + mode) % 2 == 0 else None
        out = mk.fused_attention_output_from(att, v, dest, t_out, size, mode=mode)
        ref = mk.fused_attention_output_qk_reference(q, k, None, ls, scale, v, dest, t_out, size,
                                                     att.received, mode=mode)
        assert_close(out, ref, output_truth(q, k, ls, scale, v, dest, t_out, size, att.received, mode), dtype)
        # lse=None: the launcher computes it with the same kernel, bit for bit
        lone = LAUNCHERS["fused_attention_output_qk"](q, k, None, ls, scale, v, dest, t_out, size,
                                                      att.received, mode=mode)
        assert torch.equal(lone, out)


def _timm_qkv(B, T, H, D, device, t_out=None):
    qkv = (1.5 * torch.randn(B, T, 3 * H * D, device=device)).requires_grad_(True)
    q, k, _ = qkv.reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    v_src = torch.randn(B, t_out, H * D, device=device).requires_grad_(True)
    v = v_src.reshape(B, t_out, H, D).transpose(1, 2)  # as _values in mctf.patch.timm
    return qkv, v_src, q, k, v


@pytest.mark.parametrize("mode", (0, 1, 3))
def test_fused_attention_output_qk_grad_strided(device, triton_backend, mode):
    """Gradients wrt q, k, v (strided views of timm-like projections) equal the reference's."""
    B, T, H, D = 2, 197, 3, 64
    dest, t_out = make_dest("bi-1", B, T, device)
    qkv, v_src, q, k, v = _timm_qkv(B, T, H, D, device, t_out)
    ls = (1 + 4 * torch.rand(B, T, device=device)).log()
    size = torch.randint(1, 5, (B, T), device=device).float()
    att = mk.fusion_attention(q, k, scale=D ** -0.5, log_size=ls)
    out = mk.fused_attention_output_from(att, v, dest, t_out, size, mode=mode)
    ref = mk.fused_attention_output_qk_reference(q, k, None, ls, D ** -0.5, v, dest, t_out, size,
                                                 att.received, mode=mode)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (qkv, v_src), g)
    grads_ref = torch.autograd.grad(ref, (qkv, v_src), g)
    for a, b in zip(grads, grads_ref):
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, atol=2e-5 * scale, rtol=1e-4)
    assert grads[0][..., 2 * H * D:].abs().max() == 0  # the v third of qkv is unused here
    again = mk.fused_attention_output_from(att, v, dest, t_out, size, mode=mode)
    assert torch.equal(again, out)  # deterministic
    assert torch.equal(torch.autograd.grad(again, (qkv, v_src), g)[1], grads[1])


def test_fused_attention_output_qk_grad_fp64_truth(device, triton_backend):
    """Gradients against float64 autograd of the reference (the eager backward runs in float32)."""
    B, T, H, D = 1, 77, 2, 16
    dest, t_out = make_dest("uni-0", B, T, device)
    q, k, ls = make_qk(B, H, T, D, torch.float32, device, True)
    v = torch.randn(B, H, t_out, D, device=device)
    received = torch.rand(B, T, device=device)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = LAUNCHERS["fused_attention_output_qk"](leaves[0], leaves[1], None, ls, D ** -0.5, leaves[2], dest, t_out,
                                                 None, received, mode=1)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    leaves64 = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref = mk.fused_attention_output_qk_reference(leaves64[0], leaves64[1], None, ls.double(), D ** -0.5, leaves64[2],
                                                 dest, t_out, None, received, mode=1)
    for a, b in zip(grads, torch.autograd.grad(ref, leaves64, g.double())):
        torch.testing.assert_close(a.double(), b, atol=1e-5 * b.abs().max().item(), rtol=1e-4)


def test_fused_attention_output_qk_bad_args(device, triton_backend):
    B, T, H, D = 1, 5, 1, 16
    q, k, _ = make_qk(B, H, T, D, torch.float32, device, False)
    dest = torch.tensor([[0, 1, 1, 2, 0]], device=device)
    v = torch.randn(B, H, 3, D, device=device)
    launcher = LAUNCHERS["fused_attention_output_qk"]
    with pytest.raises(ValueError, match="max pooling"):
        launcher(q, k, None, None, 0.25, v, dest, 3, None, None, mode=2)
    with pytest.raises(ValueError, match="needs attn_received"):
        launcher(q, k, None, None, 0.25, v, dest, 3, None, None, mode=1)
    with pytest.raises(ValueError, match="same shape"):
        LAUNCHERS["fusion_attention"](q, k[..., :8], scale=0.25, log_size=None)
    with pytest.raises(ValueError, match="dtype"):
        LAUNCHERS["fusion_attention"](q, k.half(), scale=0.25, log_size=None)
    # the op layer: max pooling keeps P formed, the Triton backend says so
    with pytest.raises(mk.BackendUnavailable, match="max pooling"):
        mk.fusion_attention(q, k, scale=0.25, mode=2)


def test_flash_path_runs_the_kernels(device, triton_backend, monkeypatch):
    """The model-facing ops reach the launchers and their kernels (never the references):
    lse + received; then V'[dest] gathered, torch's fused attention, and the row merge."""
    from mctf_kernels.triton import _flash_attention_kernel, _merge_kernel

    kernels = []
    for module, name in ((_flash_attention_kernel, "_attention_lse_received_kernel"),
                         (_flash_attention_kernel, "_gather_values_kernel"), (_merge_kernel, "_merge_kernel")):
        kernel = getattr(module, name)
        monkeypatch.setattr(kernel, "run",
                            lambda *a, _run=kernel.run, _n=name, **kw: kernels.append(_n) or _run(*a, **kw))
    calls = []
    for name, fn in list(LAUNCHERS.items()):
        monkeypatch.setitem(LAUNCHERS, name, lambda *a, _fn=fn, _n=name, **kw: calls.append(_n) or _fn(*a, **kw))
    for name in ("fusion_attention_reference", "fused_attention_output_qk_reference",
                 "fused_attention_output_reference", "attention_received_reference"):
        monkeypatch.setattr(ops, name, None)
    q, k, ls = make_qk(1, 2, 5, 16, torch.float32, device, True)
    att = mk.fusion_attention(q, k, scale=0.25, log_size=ls)
    dest = torch.tensor([[0, 1, 1, 2, 0]], device=device)
    mk.fused_attention_output_from(att, torch.randn(1, 2, 3, 16, device=device), dest, 3, None, mode=1,
                                   slots=slot_index(dest, 3))
    assert calls == ["fusion_attention", "fused_attention_output_qk"], calls
    assert kernels == ["_attention_lse_received_kernel", "_gather_values_kernel", "_merge_kernel"]


# ---------------------------------------------------------------- the GPU launch configurations

def _layer(q, k, ls, scale, v, dest, t_out, size, mode, slots=None):
    """One fused layer's attention: fusion_attention, then P' @ V' from q, k."""
    att = LAUNCHERS["fusion_attention"](q, k, scale=scale, log_size=ls)
    out = LAUNCHERS["fused_attention_output_qk"](q, k, att.lse, ls, scale, v, dest, t_out, size, att.received,
                                                 mode=mode, slots=slots)
    return att, out


# (T, H, dtype, mode, map): T = 197 is one 256-key tile in the received kernel, T = 577 its
# two-loop form; both cross 64-row query tiles and 64-key tiles in the output kernel.
GPU_CASES = [(197, 2, torch.float32, 1, "bi-1"), (197, 6, torch.float16, 1, "random"),
             (197, 3, torch.float32, 0, "random"), (197, 4, torch.float16, 3, "uni-0"),
             (577, 3, torch.float32, 1, "random"), (577, 5, torch.float16, 1, "bi-1")]


@pytest.mark.parametrize("T,H,dtype,mode,kind", GPU_CASES)
def test_gpu_configs_match_fp64(device, triton_backend, T, H, dtype, mode, kind):
    """The block sizes, warps and tile loops a GPU runs, against float64 truths."""
    B, D = 1, 64
    q, k, ls = make_qk(B, H, T, D, dtype, device, True)
    scale = D ** -0.5
    dest, t_out = make_dest(kind, B, T, device)
    v = torch.randn(B, H, t_out, D, device=device, dtype=dtype)
    size = torch.randint(1, 5, (B, T), device=device).float()
    with force_gpu_configs():
        att, out = _layer(q, k, ls, scale, v, dest, t_out, size, mode)
        att2, out2 = _layer(q, k, ls, scale, v, dest, t_out, size, mode, slots=slot_index(dest, t_out))
    logits = truth_logits(q, k, scale, ls)
    lse = logits.logsumexp(dim=-1)
    torch.testing.assert_close(att.lse.double(), lse, atol=2e-5, rtol=2e-6)
    torch.testing.assert_close(att.received.double(), (logits - lse[..., None]).exp().mean(dim=(1, 2)),
                               atol=1e-9, rtol=2e-5)
    ref = mk.fused_attention_output_qk_reference(q, k, None, ls, scale, v, dest, t_out, size, att.received, mode=mode)
    assert_close(out, ref, output_truth(q, k, ls, scale, v, dest, t_out, size, att.received, mode), dtype)
    # deterministic, and a precomputed slot index gives the same bits
    assert torch.equal(att2.lse, att.lse) and torch.equal(att2.received, att.received) and torch.equal(out2, out)


@pytest.mark.skipif(not ON_CUDA, reason="bfloat16 kernels run on CUDA only: the Triton interpreter computes "
                                        "bfloat16 tl.dot wrongly, so a CPU result would not test the kernel")
@pytest.mark.parametrize("T", (197, 577))
def test_bfloat16_on_cuda(triton_backend, T):
    B, H, D = 2, 6, 64
    q, k, ls = make_qk(B, H, T, D, torch.bfloat16, "cuda", True)
    dest, t_out = make_dest("bi-1", B, T, "cuda")
    v = torch.randn(B, H, t_out, D, device="cuda", dtype=torch.bfloat16)
    size = torch.randint(1, 5, (B, T), device="cuda").float()
    att, out = _layer(q, k, ls, D ** -0.5, v, dest, t_out, size, 1)
    ref = mk.fused_attention_output_qk_reference(q, k, None, ls, D ** -0.5, v, dest, t_out, size, att.received, mode=1)
    assert_close(out, ref, output_truth(q, k, ls, D ** -0.5, v, dest, t_out, size, att.received, 1), torch.bfloat16)


def test_output_layout_is_what_proj_reads(device, triton_backend):
    """(B, H, T', D) view of (B, T', H, D) storage: the model's transpose(1, 2).reshape is free."""
    B, H, T, D = 2, 3, 37, 16
    q, k, ls = make_qk(B, H, T, D, torch.float32, device, False)
    dest, t_out = make_dest("bi-1", B, T, device)
    _att, out = _layer(q, k, ls, 0.25, torch.randn(B, H, t_out, D, device=device), dest, t_out, None, 3)
    assert out.shape == (B, H, t_out, D) and out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("gpu", (False, True))
def test_out_of_range_dest_reads_and_writes_nothing_outside(device, triton_backend, gpu):
    """Slots outside [0, T') (here T', 10**6, -1, -10**6): those tokens contribute nothing as keys
    or as queries, slots left without members are NaN (the reference's 0/0); nothing is
    read or written outside the tensors (a stray access would crash or show as garbage)."""
    B, H, T, D = 2, 2, 197, 64
    q, k, ls = make_qk(B, H, T, D, torch.float32, device, True)
    dest, t_out = make_dest("bi-1", B, T, device)
    bad = dest.clone()
    bad[0, 5], bad[0, 100], bad[1, 196], bad[1, 0] = t_out, 10 ** 6, t_out, 10 ** 6
    bad[0, 0], bad[0, 64], bad[1, 130] = -1, -10 ** 6, -1
    v = torch.randn(B, H, t_out, D, device=device)
    size = torch.randint(1, 5, (B, T), device=device).float()
    att = mk.fusion_attention(q, k, scale=D ** -0.5, log_size=ls)
    with force_gpu_configs() if gpu else torch.no_grad():
        out = LAUNCHERS["fused_attention_output_qk"](q, k, att.lse, ls, D ** -0.5, v, bad, t_out, size,
                                                     att.received, mode=1)
    # truth: keys and queries with a bad slot dropped (float64)
    ok = (bad >= 0) & (bad < t_out)
    probs = truth_logits(q, k, D ** -0.5, ls).softmax(dim=-1) * ok[:, None, None, :]
    safe = torch.where(ok, bad, 0)
    per_query = probs @ v.double().gather(2, safe[:, None, :, None].expand(B, H, T, D))
    w = mk.pooling_weights(1, size, att.received).double() * ok
    onehot = (safe[:, :, None] == torch.arange(t_out, device=device)) & ok[:, :, None]  # (B, T, T')
    num = torch.einsum("bts,bhtd->bhsd", onehot.double() * w[..., None], per_query)
    truth = num / torch.einsum("bts->bs", onehot.double() * w[..., None])[:, None, :, None]
    torch.testing.assert_close(out.double(), truth, atol=2e-5, rtol=1e-5, equal_nan=True)
    assert out.isnan().any()  # some slot lost its only member


def test_garbage_slot_index_stays_in_bounds(device, triton_backend):
    """A precomputed slot index with values far outside its range (and int32): the kernel
    clamps every index it reads, so it runs and writes only its output."""
    B, H, T, D = 1, 2, 77, 16
    q, k, ls = make_qk(B, H, T, D, torch.float32, device, False)
    dest, t_out = make_dest("bi-1", B, T, device)
    att = mk.fusion_attention(q, k, scale=0.25)
    v = torch.randn(B, H, t_out, D, device=device)
    order = torch.randint(-10 ** 6, 10 ** 6, (B, T), device=device)
    starts = torch.randint(-10 ** 6, 10 ** 6, (B, t_out + 1), device=device, dtype=torch.int32)
    with force_gpu_configs():
        out = LAUNCHERS["fused_attention_output_qk"](q, k, att.lse, None, 0.25, v, dest, t_out, None, None,
                                                     mode=3, slots=(order, starts))
    assert out.shape == (B, H, t_out, D)
    with pytest.raises(ValueError, match="slots"):
        LAUNCHERS["fused_attention_output_qk"](q, k, att.lse, None, 0.25, v, dest, t_out, None, None, mode=3,
                                               slots=(order, starts[:, 1:]))


@pytest.mark.parametrize("fills_gpu", (False, True))
def test_one_fused_layer_launches(device, triton_backend, monkeypatch, fills_gpu):
    """Per fused layer the attention costs three Triton launches (lse + received; V'[dest]
    with the log-size mask; the row merge) and torch's fused attention, when the slot index
    is shared: q.k^T is computed twice (T <= 256). A batch that fills the GPU (GPU configs)
    gets received from one program per image and launches nothing else; a smaller one adds
    one torch kernel, the fixed-order sum of the partials."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mctf_kernels.triton import _flash_attention_kernel, _merge_kernel, configs, flash_attention

    monkeypatch.setattr(configs, "sm_count", lambda _device: 1 if fills_gpu else 1 << 20)

    launches = []
    for module, name in ((_flash_attention_kernel, "_attention_lse_received_kernel"),
                         (_flash_attention_kernel, "_gather_values_kernel"), (_merge_kernel, "_merge_kernel")):
        kernel = getattr(module, name)
        monkeypatch.setattr(kernel, "run", lambda *a, _n=name, **kw: launches.append(_n))  # count, do not run

    free = {"empty", "empty_strided", "new_empty", "view", "_unsafe_view", "transpose", "permute", "expand", "as_strided",
            "detach", "alias", "t", "slice", "select", "unsqueeze", "squeeze", "lift_fresh", "_to_copy"}

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in free and not name.startswith("mctf"):
                self.ops.append(name)
            return func(*args, **(kwargs or {}))

    B, H, T, D = 2, 6, 197, 64
    q, k, ls = make_qk(B, H, T, D, torch.float16, device, True)
    dest, t_out = make_dest("bi-1", B, T, device)
    slots = slot_index(dest, t_out)
    v = torch.randn(B, H, t_out, D, device=device, dtype=torch.float16)
    size = torch.randint(1, 5, (B, T), device=device).float()
    # the ops' bodies (a dispatch mode sees a custom op whole, not the torch ops inside)
    with CountOps() as counter, force_gpu_configs():
        received, lse, _mask = flash_attention._fusion_attention_impl(q, k, ls, D ** -0.5, False)
        flash_attention._fused_qk_impl(q, k, lse, ls, D ** -0.5, v, dest, t_out, size, received, 1, *slots)
    assert launches == ["_attention_lse_received_kernel", "_gather_values_kernel", "_merge_kernel"]
    attention = [op for op in counter.ops if "scaled_dot_product" in op]
    assert len(attention) == 1, counter.ops  # one fused-attention kernel (the CPU one here)
    others = [op for op in counter.ops if op not in attention]
    assert others == ([] if fills_gpu else ["sum"]), counter.ops
    # given the sizes (the model's inference flow), the same one launch also takes their log
    # and writes the output attention's mask: no torch log, nothing else
    launches.clear()
    with CountOps() as counter, force_gpu_configs():
        flash_attention._fusion_attention_impl(q, k, size, D ** -0.5, True)
    assert launches == ["_attention_lse_received_kernel"]
    assert counter.ops == ([] if fills_gpu else ["sum"]), counter.ops


def test_received_one_program_per_image(device, triton_backend, monkeypatch):
    """One program per image walks heads and query blocks in a fixed order and writes
    received itself (no sum launch): on CUDA the GPU configs with a batch that fills the
    GPU (half precision), on CPU the interpreter's configs (its fp32 GPU configs use
    partials). Same lse and received (to summation order) as the per-query-block
    partials, the float64 truth, and the same bits every run."""
    from mctf_kernels.triton import configs

    B, H, T, D = 3, 3, 197, 64
    dtype = torch.float16 if ON_CUDA else torch.float32
    q, k, ls = make_qk(B, H, T, D, dtype, device, True)
    scale = D ** -0.5
    with force_gpu_configs():
        monkeypatch.setattr(configs, "sm_count", lambda _device: 1 << 20)
        assert not configs.attention_received_qk_config(T, D, True, dtype == torch.float32, B, 1 << 20)["PER_IMAGE"]
        parts = mk.fusion_attention(q, k, scale=scale, log_size=ls)
    monkeypatch.setattr(configs, "sm_count", lambda _device: B)
    assert configs.attention_received_qk_config(T, D, ON_CUDA, dtype == torch.float32, B, B)["PER_IMAGE"]
    one = mk.fusion_attention(q, k, scale=scale, log_size=ls)
    again = mk.fusion_attention(q, k, scale=scale, log_size=ls)
    assert torch.equal(again.lse, one.lse) and torch.equal(again.received, one.received)
    torch.testing.assert_close(one.lse, parts.lse, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(one.received, parts.received, atol=1e-9, rtol=1e-6)
    logits = truth_logits(q, k, scale, ls)
    lse = logits.logsumexp(dim=-1)
    torch.testing.assert_close(one.lse.double(), lse, atol=2e-5, rtol=2e-6)
    torch.testing.assert_close(one.received.double(), (logits - lse[..., None]).exp().mean(dim=(1, 2)),
                               atol=1e-9, rtol=2e-5)


@pytest.mark.skipif(not ON_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_on_the_tensors_device(triton_backend):
    """A model on cuda:1 while cuda:0 is current: every launch runs on the tensors' device."""
    B, H, T, D = 2, 3, 197, 64
    q, k, ls = make_qk(B, H, T, D, torch.float16, "cuda:1", True)
    dest, t_out = make_dest("bi-1", B, T, "cuda:1")
    v = torch.randn(B, H, t_out, D, device="cuda:1", dtype=torch.float16)
    with torch.cuda.device(0):
        att, out = _layer(q, k, ls, D ** -0.5, v, dest, t_out, None, 3)
    ref = mk.fused_attention_output_qk_reference(q, k, None, ls, D ** -0.5, v, dest, t_out, None, att.received, mode=3)
    assert_close(out, ref, output_truth(q, k, ls, D ** -0.5, v, dest, t_out, None, att.received, 3), torch.float16)


@pytest.mark.skipif(not ON_CUDA, reason="torch.compile of user Triton kernels needs CUDA (fake tensors cannot run the interpreter)")
def test_flash_ops_torch_compile_fullgraph(triton_backend):
    B, T, H, D = 2, 197, 3, 64
    dest, t_out = make_dest("bi-1", B, T, "cuda")
    qkv, v_src, q, k, v = _timm_qkv(B, T, H, D, "cuda", t_out)
    ls = (1 + 4 * torch.rand(B, T, device="cuda")).log()
    size = torch.randint(1, 5, (B, T), device="cuda").float()

    def f(qkv, v_src):
        q, k, _ = qkv.reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        v = v_src.reshape(B, t_out, H, D).transpose(1, 2)
        att = mk.fusion_attention(q, k, scale=D ** -0.5, log_size=ls)
        out = mk.fused_attention_output_from(att, v, dest, t_out, size, mode=1)
        return out.square().sum(), att.received

    (loss, received) = torch.compile(f, fullgraph=True)(qkv, v_src)
    grads = torch.autograd.grad(loss, (qkv, v_src))
    (ref_loss, ref_received) = f(qkv, v_src)
    ref_grads = torch.autograd.grad(ref_loss, (qkv, v_src))
    torch.testing.assert_close(received, ref_received)
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
