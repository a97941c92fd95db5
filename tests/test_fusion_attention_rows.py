"""``fusion_attention`` given the token sizes (the kernel takes their log and writes the
output attention's mask), ``fusion_attention_rows``, and the model's inference flow that
uses them (docs/algorithm.md, "One-step-ahead attention").

On CPU the kernel runs under TRITON_INTERPRET=1, with the interpreter's launch
configurations and with the GPU's (``force_gpu_configs``: 64-query tiles, the two-loop
form at T = 577, and the one-program-per-image grid). The interpreter computes bf16 dots
wrongly, so bf16 is checked on CUDA only.
"""
import contextlib

import pytest
import timm
import torch

import mctf
import mctf_kernels as mk
from mctf_kernels.triton import configs
from mctf_kernels.triton.configs import force_gpu_configs

ON_CUDA = torch.cuda.is_available()
DTYPES = (torch.float32, torch.float16, torch.bfloat16) if ON_CUDA else (torch.float32, torch.float16)


def _eps(dtype):
    return torch.finfo(dtype).eps


def _qk_size(B, H, T, D, dtype, device):
    q = (2 * torch.randn(B, H, T, D, device=device)).to(dtype)
    k = (1.5 * torch.randn(B, H, T, D, device=device)).to(dtype)
    size = torch.randint(1, 9, (B, T), device=device).float() * (1 + torch.rand(B, T, device=device))
    return q, k, size


def _truths(q, k, scale, size):
    """float64 lse and received from the kernel's operands (q * scale rounded to q's dtype, k)."""
    logits = (q * scale).double() @ k.double().transpose(-1, -2) + size.double().log()[:, None, None, :]
    lse = logits.logsumexp(dim=-1)
    return lse, (logits - lse[..., None]).exp().mean(dim=(1, 2))


def _check_mask(att, size, dtype):
    """(B, 1, 1, T) view of rows padded to 16 elements, log(size) within one ulp of q's dtype
    (the kernel's float32 log may differ from the exact one in the last bit)."""
    B, T = size.shape
    pad = -(-T // 16) * 16
    assert att.mask.dtype == dtype and att.mask.shape == (B, 1, 1, T)
    assert att.mask.stride() == (pad, pad, pad, 1) and att.mask.storage_offset() == 0
    truth = size.double().log()
    err = (att.mask[:, 0, 0].double() - truth).abs()
    bound = _eps(dtype) * truth.abs() + (2.0 ** -24)  # one ulp of q's dtype, plus float32's own rounding
    assert bool((err <= bound).all()), (err - bound).max()


# (grid label, batch, forced GPU configuration, SMs the GPU policy assumes)
GRIDS = {
    "interpreter": (2, False, None),  # one program per image, the whole row in one tile
    "gpu-query-blocks": (2, True, None),  # per (b * h, 64-query block): ONE_TILE at 197, two loops at 577
    "gpu-per-image": (3, True, 2),  # batch >= SMs: one program per image (half precision, D <= 64, T <= 256)
}
KERNEL_CASES = [(grid, T, dtype) for grid in GRIDS for T in (197, 577) for dtype in DTYPES
                if grid != "gpu-per-image" or (T <= 256 and dtype != torch.float32)]


@pytest.mark.parametrize("grid,T,dtype", KERNEL_CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_kernel_log_and_mask(device, triton_backend, monkeypatch, grid, T, dtype):
    B, forced, sms = GRIDS[grid]
    H, D = 2, 64
    if sms is not None:
        monkeypatch.setattr(configs, "sm_count", lambda _device: sms)
    q, k, size = _qk_size(B, H, T, D, dtype, device)
    scale = D ** -0.5
    with force_gpu_configs() if forced else contextlib.nullcontext():
        cfg = configs.attention_received_qk_config(T, D, configs.gpu_configs(q.device), dtype == torch.float32,
                                                   batch=B, sms=configs.sm_count(q.device))
        att = mk.fusion_attention(q, k, scale=scale, size=size)
    assert cfg["PER_IMAGE"] == (grid != "gpu-query-blocks")
    assert cfg["ONE_TILE"] == (T <= cfg["BLOCK_N"])
    assert att.probs is None and att.size is size and att.log_size is None
    _check_mask(att, size, dtype)
    lse, received = _truths(q, k, scale, size)
    # float32 accumulation of exact products, plus the log's last bit (~6e-8 relative)
    torch.testing.assert_close(att.lse.double(), lse, atol=3e-5, rtol=2e-6)
    torch.testing.assert_close(att.received.double(), received, atol=1e-9, rtol=3e-5)
    # the same numbers as log_size given (the log from torch instead of the kernel)
    with force_gpu_configs() if forced else contextlib.nullcontext():
        given = mk.fusion_attention(q, k, scale=scale, log_size=size.log())
    torch.testing.assert_close(att.lse, given.lse, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(att.received, given.received, atol=1e-9, rtol=2e-5)
    assert given.mask is None  # sizes not given: no mask


def test_reference_mask_and_sizes(device):
    q, k, size = _qk_size(2, 3, 37, 16, torch.float32, device)
    with mk.use_backend("reference"):
        att = mk.fusion_attention(q, k, scale=0.25, size=size)
        ref = mk.fusion_attention(q, k, scale=0.25, log_size=size.log())
    assert torch.equal(att.mask[:, 0, 0], size.log()) and att.mask.shape == (2, 1, 1, 37)
    assert torch.equal(att.probs, ref.probs) and torch.equal(att.received, ref.received)
    half = mk.fusion_attention_reference(q.half(), k.half(), scale=0.25, size=size)
    assert torch.equal(half.mask[:, 0, 0], size.log().half())
    assert mk.fusion_attention_reference(q, k, scale=0.25).mask is None


@pytest.mark.parametrize("with_size", (False, True))
def test_attention_rows(device, triton_backend, with_size):
    """Triton's rows (torch's fused attention with the kernel's mask) and the reference's
    explicit P @ v against float64."""
    B, H, T, D = 2, 3, 197, 48
    q, k, size = _qk_size(B, H, T, D, torch.float32, device)
    size = size if with_size else None
    v = torch.randn(B, H, T, D, device=device)
    scale = D ** -0.5
    att = mk.fusion_attention(q, k, scale=scale, size=size)
    rows = mk.fusion_attention_rows(att, v)
    logits = (q * scale).double() @ k.double().transpose(-1, -2)
    if with_size:
        logits = logits + size.double().log()[:, None, None, :]
    truth = logits.softmax(dim=-1) @ v.double()
    assert rows.shape == (B, H, T, D) and rows.dtype == v.dtype
    torch.testing.assert_close(rows.double(), truth, atol=2e-5, rtol=2e-5)
    with mk.use_backend("reference"):
        ref_att = mk.fusion_attention(q, k, scale=scale, size=size)
        ref = mk.fusion_attention_rows(ref_att, v)
    torch.testing.assert_close(ref.double(), truth, atol=2e-5, rtol=2e-5)
    # recomputed explicitly from the q, k the Triton path kept
    torch.testing.assert_close(mk.fusion_attention_rows_reference(att, v).double(), truth, atol=2e-5, rtol=2e-5)
    # a FusionAttention built from log sizes takes them rounded to q's dtype as its mask
    if with_size:
        from_log = mk.fusion_attention(q, k, scale=scale, log_size=size.log())
        torch.testing.assert_close(mk.fusion_attention_rows(from_log, v), rows, atol=1e-6, rtol=1e-6)


def test_output_from_a_sizes_attention(device, triton_backend):
    """fused_attention_output_from takes log(size) from an attention given sizes (training's op)."""
    B, H, T, D = 2, 2, 37, 16
    q, k, size = _qk_size(B, H, T, D, torch.float32, device)
    dest = torch.cat([torch.arange(30, device=device), torch.randint(0, 30, (7,), device=device)])[None].repeat(B, 1)
    v = torch.randn(B, H, 30, D, device=device)
    att = mk.fusion_attention(q, k, scale=0.25, size=size)
    given = mk.fusion_attention(q, k, scale=0.25, log_size=size.log())
    out = mk.fused_attention_output_from(att, v, dest, 30, size, mode=1)
    want = mk.fused_attention_output_from(given, v, dest, 30, size, mode=1)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ("reference", "triton"))
def test_argument_errors(backend):
    q, k = torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    size = torch.rand(2, 9) + 1
    with mk.use_backend(backend):
        with pytest.raises(ValueError, match="not both"):
            mk.fusion_attention(q, k, scale=0.5, size=size, log_size=size.log())
        with pytest.raises(ValueError, match="size must have shape"):
            mk.fusion_attention(q, k, scale=0.5, size=size[:, :8])
        with pytest.raises(TypeError, match="size must be a floating tensor"):
            mk.fusion_attention(q, k, scale=0.5, size=torch.ones(2, 9, dtype=torch.long))
        with pytest.raises(ValueError, match="size is on meta"):
            mk.fusion_attention(q, k, scale=0.5, size=size.to("meta"))
        bad = size.clone()
        bad[1, 3] = 0.0
        with pytest.raises(ValueError, match="size"):
            mk.fusion_attention(q, k, scale=0.5, size=bad, validate=True)
        att = mk.fusion_attention(q, k, scale=0.5, size=size)
        v = torch.randn(2, 3, 9, 8)
        with pytest.raises(TypeError, match="att must be the FusionAttention"):
            mk.fusion_attention_rows((q, k), v)
        with pytest.raises(ValueError, match="v must have shape"):
            mk.fusion_attention_rows(att, v[:, :, :7])
        with pytest.raises(ValueError, match="v must have shape"):
            mk.fusion_attention_rows(att, v[0])
        with pytest.raises(TypeError, match="v must be a floating tensor"):
            mk.fusion_attention_rows(att, v.long())
        with pytest.raises(ValueError, match="v is on meta"):
            mk.fusion_attention_rows(att, v.to("meta"))
        # torch's attention needs q, k, v of one dtype: both backends refuse another
        with pytest.raises(TypeError, match="same dtype"):
            mk.fusion_attention_rows(att, v.double())
        v_nan = v.clone()
        v_nan[0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="v has 1 non-finite"):
            mk.fusion_attention_rows(att, v_nan, validate=True)
        empty = mk.fusion_attention(q[:0], k[:0], scale=0.5, size=size[:0])
        assert mk.fusion_attention_rows(empty, v[:0]).shape == (0, 3, 9, 8)


# ---------------------------------------------------------------- the model's inference flow

# (prop_attn, pooling, init_values): proportional attention on and off, every weighted
# pooling, with and without LayerScale
MODELS = [(1, 1, None), (0, 1, 0.5), (1, 0, 0.5), (1, 3, None), (0, 3, 0.5)]


def _model(prop_attn, pooling, init_values, img_size=96, depth=4):
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=img_size, depth=depth,
                              init_values=init_values).eval()
    cfg = mctf.MCTFConfig.from_mctf_type([4, 0, 0, prop_attn, 1, 1, 20, 40, 1, pooling, 0],
                                         activate_layer=range(1, depth))
    return mctf.patch.timm(model, cfg)


def _run(model, x, grad):
    with torch.set_grad_enabled(grad):
        out = model(x).detach()
    state = model.mctf_state
    return out, list(state.tokens_per_block), state.size.clone()


@pytest.mark.parametrize("backend", ("reference", "triton"))
@pytest.mark.parametrize("prop_attn,pooling,init_values", MODELS)
def test_model_rows_flow_matches_the_current_flow(device, monkeypatch, backend, prop_attn, pooling, init_values):
    """fp32 DeiT-T-sized random model (dim 192, 3 heads, 4 blocks at 96 px: T = 37 -> 25):
    the inference flow (values at the token rows, the attention's rows, proj, then the row
    merge) against the flow with gradients on (values of the fused tokens, P' @ V', proj),
    which is today's training path: same tokens and sizes, logits within fp32 rounding."""
    model = _model(prop_attn, pooling, init_values).to(device)
    x = torch.randn(2, 3, 96, 96, device=device)
    calls = []
    rows = mk.fusion_attention_rows
    monkeypatch.setattr(mk, "fusion_attention_rows", lambda *a, **kw: calls.append(1) or rows(*a, **kw))
    with mk.use_backend(backend):
        new, tokens_new, size_new = _run(model, x, grad=False)
        assert len(calls) == 3  # every fused block took the rows flow
        old, tokens_old, size_old = _run(model, x, grad=True)
        assert len(calls) == 3  # with gradients: today's flow
    assert tokens_new == tokens_old == [37, 33, 29, 25]
    assert torch.equal(size_new, size_old)
    err = ((new - old).abs().max() / old.abs().max()).item()
    assert err < 5e-6, err  # measured ~4e-7: proj and the row merge swapped, rounding only


def test_model_rows_flow_skips_max_pooling_and_scale_norm(device, monkeypatch):
    """Max pooling does not commute with proj; an attention output norm (timm's scale_norm)
    sits between the heads and proj: both keep today's flow."""
    calls = []
    monkeypatch.setattr(mk, "fusion_attention_rows", lambda *a, **kw: calls.append(1))
    with mk.use_backend("reference"), torch.no_grad():
        _model(1, 2, None).to(device)(torch.randn(1, 3, 96, 96, device=device))
        model = _model(1, 1, None, depth=3)
        for blk in model.blocks:
            blk.attn.norm = torch.nn.LayerNorm(blk.attn.proj.in_features)
        model.to(device)(torch.randn(1, 3, 96, 96, device=device))
    assert not calls


# (timm model, create kwargs, MCTF config overrides, dtype, train mode, autocast)
VARIANTS = {
    "trace_source": ("deit_tiny_patch16_224", {}, {"trace_source": True}, torch.float32, False, False),
    "distilled": ("deit_tiny_distilled_patch16_224", {}, {}, torch.float32, False, False),
    "registers": ("vit_small_patch16_224", {"reg_tokens": 4, "no_embed_class": True}, {}, torch.float32, False, False),
    "float64": ("deit_tiny_patch16_224", {"init_values": 0.3}, {}, torch.float64, False, False),
    # train mode under no_grad: drop path on (the residual stays outside the merge) and off
    "train_drop_path": ("deit_tiny_patch16_224", {"init_values": 0.3}, {}, torch.float32, True, False),
    "train_no_drop": ("deit_tiny_patch16_224", {"init_values": 0.3, "drop_path_rate": 0.0}, {}, torch.float32,
                      True, False),
    "autocast_fp16": ("deit_tiny_patch16_224", {"init_values": 0.3}, {}, torch.float32, False, True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_rows_flow_variants(device, monkeypatch, variant):
    """The rows flow against today's flow (forced by refusing the rows flow) in the same no-grad
    forward, on the Triton backend: prefix-token layouts, sources, float64, train mode with and
    without drop path, and autocast. Same tokens, sizes and sources; logits within rounding."""
    name, kwargs, overrides, dtype, train, autocast = VARIANTS[variant]
    if variant == "train_drop_path":
        kwargs = dict(kwargs, drop_path_rate=0.5)
    model = timm.create_model(name, pretrained=False, img_size=64, depth=3, **kwargs).to(device, dtype).train(train)
    model = mctf.patch.timm(model, mctf.MCTFConfig(r=3, layers=(1, 2), **overrides))
    x = torch.randn(2, 3, 64, 64, device=device, dtype=dtype)
    from mctf.patch.timm import MCTFBlock

    rows_flow = MCTFBlock._rows_flow
    results = {}
    for allow in (True, False):
        taken = []
        monkeypatch.setattr(MCTFBlock, "_rows_flow",
                            lambda self, *a: taken.append(rows_flow(self, *a)) or (taken[-1] and allow))
        torch.manual_seed(0)  # the same drop-path draws in both runs
        with mk.use_backend("triton"), torch.no_grad(), torch.autocast(torch.device(device).type, torch.float16, enabled=autocast):
            out = model(x).float()
        state = model.mctf_state
        results[allow] = (out, list(state.tokens_per_block), state.size.clone(),
                          None if state.source is None else state.source.clone())
        assert taken == [True, True]  # both fused blocks could take the rows flow
    (new, tok_new, size_new, src_new), (old, tok_old, size_old, src_old) = results[True], results[False]
    assert tok_new == tok_old and torch.equal(size_new, size_old)
    assert (src_new is None) == (src_old is None) and (src_new is None or torch.equal(src_new, src_old))
    err = ((new - old).abs().max() / old.abs().max()).item()
    # fp32 / float64: ~4e-7 (rounding of proj and the row merge swapped); fp16 autocast ~5e-4
    assert err < (5e-3 if autocast else 5e-6), err
