"""The whole patched model: backend 'triton' equals backend 'reference' (logits,
sizes, token counts), on CPU through the interpreter and on CUDA in every dtype;
torch.compile(fullgraph=True) of a patched model runs and matches."""
import pytest
import timm
import torch

import mctf
from mctf_kernels.triton import LAUNCHERS

ON_CUDA = torch.cuda.is_available()


def build(device, dtype=torch.float32, family="deit", **cfg):
    if ON_CUDA:
        kw = dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3)  # deit-tiny, T=197
    else:
        kw = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3)  # T=65 keeps the interpreter quick
    name = {"deit": "deit_tiny_patch16_224", "distilled": "deit_tiny_distilled_patch16_224"}[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kw)
    with torch.no_grad():  # peaky attention so informativeness matters
        for blk in model.blocks:
            blk.attn.qkv.weight[: 2 * blk.attn.qkv.in_features] *= 4
    layers = tuple(range(1, len(model.blocks)))
    model = mctf.patch.timm(model, mctf.MCTFConfig(r=0.25 if not ON_CUDA else 16, layers=layers, **cfg))
    return model.to(device=device, dtype=dtype).eval()


def run(model, images, backend):
    with torch.no_grad(), mctf.use_backend(backend):
        logits = model(images)
    state = model.mctf_state
    return logits.float(), state.size.clone(), list(state.tokens_per_block)


CONFIGS = [
    dict(),  # the MCTF preset's options
    dict(pooling=0, bidirectional=False),
    dict(pooling=3, one_step_ahead=2),
    dict(pooling=2, one_step_ahead=0),
    dict(prop_attn=False, tau_size=0),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "preset")
def test_triton_model_equals_reference_fp32(device, cfg):
    model = build(device, **cfg)
    images = torch.randn(2, 3, *model.patch_embed.img_size, device=device)
    ref = run(model, images, "reference")
    got = run(model, images, "triton")
    assert got[2] == ref[2]
    assert torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-4)


def test_distilled_model_equals_reference(device):
    model = build(device, family="distilled")
    images = torch.randn(2, 3, *model.patch_embed.img_size, device=device)
    ref, got = run(model, images, "reference"), run(model, images, "triton")
    assert got[2] == ref[2] and torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not ON_CUDA, reason="half precision models run on CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_model_equals_reference_half(dtype):
    model = build("cuda", dtype=dtype)
    images = torch.randn(8, 3, 224, 224, device="cuda", dtype=dtype)
    ref, got = run(model, images, "reference"), run(model, images, "triton")
    assert got[2] == ref[2]
    # half-precision residual streams can flip near-tied matches; the logits must still agree
    # to within the model's own half-vs-fp32 error
    fp32 = run(build("cuda"), images.float(), "reference")[0]
    budget = (ref[0] - fp32).abs().max().item()
    assert (got[0] - ref[0]).abs().max().item() <= 3 * budget + 1e-2


def test_model_with_triton_backend_launches_kernels(device, monkeypatch):
    calls = []
    for name, fn in list(LAUNCHERS.items()):
        monkeypatch.setitem(LAUNCHERS, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    model = build(device)
    images = torch.randn(1, 3, *model.patch_embed.img_size, device=device)
    run(model, images, "triton")
    fused_layers = len(model.blocks) - 1
    for op in ("fusion_attention", "match"):
        assert calls.count(op) == fused_layers, op
    assert "slot_index" not in calls  # the matcher returns the slot index the other ops share
    # inference: the tokens' merge and the merge of proj's rows; P' @ V' is not formed as such
    assert calls.count("merge") == 2 * fused_layers and "fused_attention_output_qk" not in calls


@pytest.mark.parametrize("one_step_ahead", (1, 2))
def test_reference_model_skips_the_slot_index(device, monkeypatch, one_step_ahead):
    """The reference ops pool by dest and never read slots=: with the reference backend the
    model layer computes no slot index (no sort per fused layer), and its results are those
    of a run that passes one to every op."""
    import mctf_kernels.ops as ops

    model = build(device, one_step_ahead=one_step_ahead)
    images = torch.randn(2, 3, *model.patch_embed.img_size, device=device)
    passed = []
    real_merge = ops.merge
    monkeypatch.setattr(ops, "merge", lambda *a, _m=real_merge, **k: passed.append(k.get("slots")) or _m(*a, **k))
    monkeypatch.setattr("mctf_kernels.merge", ops.merge)
    ref = run(model, images, "reference")
    assert passed and all(s is None for s in passed)

    sorted_index = []
    real_ref = ops.slot_index_reference

    def given(dest, t_out):  # as the model layer did before: one index per layer, handed to the ops
        sorted_index.append(t_out)
        return real_ref(dest, t_out)
    monkeypatch.setattr(ops, "shared_slot_index", given)
    monkeypatch.setattr("mctf_kernels.shared_slot_index", given)
    with_index = run(model, images, "reference")
    assert len(sorted_index) == len(model.blocks) - 1
    assert with_index[2] == ref[2] and torch.equal(with_index[1], ref[1]) and torch.equal(with_index[0], ref[0])


def test_torch_compile_fullgraph_reference():
    model = build("cpu") if not ON_CUDA else build("cuda")
    device = next(model.parameters()).device
    images = torch.randn(2, 3, *model.patch_embed.img_size, device=device)
    want = run(model, images, "reference")[0]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if not ON_CUDA else "inductor")
    with torch.no_grad(), mctf.use_backend("reference"):
        got = compiled(images)
    torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not ON_CUDA, reason="Triton ops are traced by torch.compile on CUDA only (the interpreter has no fake-tensor path)")
def test_torch_compile_fullgraph_triton():
    model = build("cuda", dtype=torch.float16)
    images = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.float16)
    want = run(model, images, "triton")[0]
    with mctf.use_backend("triton"):
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            got = compiled(images)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need CUDA")
def test_cuda_graph_capture_triton():
    model = build("cuda", dtype=torch.float16)
    static = torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.no_grad(), mctf.use_backend("triton"):
        want = model(static)  # warm up: compile kernels outside capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(static)
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), want.float(), rtol=1e-3, atol=1e-3)


def test_training_with_attention_dropout_triton_equals_reference(device, monkeypatch):
    """Attention dropout in training forms P (dropped out by timm's module) and takes the
    P-form fused_attention_output kernel: logits and gradients as the reference's, the
    dropout mask being the same under the same seed."""
    model = build(device).train()
    for blk in model.blocks:
        blk.attn.attn_drop.p = 0.25
    images = torch.randn(2, 3, *model.patch_embed.img_size, device=device)
    calls = []
    fn = LAUNCHERS["fused_attention_output"]
    monkeypatch.setitem(LAUNCHERS, "fused_attention_output", lambda *a, **k: calls.append(1) or fn(*a, **k))

    def step(backend):
        model.zero_grad()
        torch.manual_seed(1)
        with mctf.use_backend(backend):
            logits = model(images)
        logits.float().square().sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ref = step("reference")
    assert not calls
    got = step("triton")
    assert len(calls) == len(model.blocks) - 1
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-4)
    assert len(got[1]) == len(ref[1])
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * max(1.0, b.abs().max().item()))
