"""ToMe mode: its config and schedules, the raw-cosine score of the ops, and the ToMe
patch on every model family the MCTF patch supports (reference backend; the Triton
kernels run the same models in tests/test_tome_conformance.py and test_triton_match.py)."""
import pickle

import pytest
import torch
from torch import nn

import mctf
import mctf_kernels as mk
from mctf.patch.tome import ToMeBlock


# ---------------------------------------------------------------- config and schedule
def test_schedules_follow_tome():
    assert mctf.ToMeConfig(r=16).schedule(12) == (16,) * 12
    # ToMe's (r, inflection): -1 decreasing from 2r to 0, +1 increasing, int() of lo + i * step
    assert mctf.ToMeConfig(r=16, inflection=-1.0).schedule(12) == tuple(int(32 - 32 / 11 * i) for i in range(12))
    assert mctf.ToMeConfig.from_tome((8, 0.5)).schedule(4) == (4, 6, 9, 12)
    assert mctf.ToMeConfig.from_tome([5, 4]).schedule(4) == (5, 4, 0, 0)
    assert mctf.ToMeConfig(r=[5, 4]).r == (5, 4)
    assert mctf.ToMeConfig(r=3, inflection=1.0).schedule(1) == (0,)


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=-1), "r must be >= 0"), (dict(r=1.5), "r must be an int"), (dict(r=[1, -2]), "per-block"),
    (dict(r=4, inflection=2.0), "inflection"), (dict(r=[1, 2], inflection=0.5), "per-block r takes no"),
    (dict(r=(4, 0.5)), "per-block"),  # a tuple is per-block here; ToMe's (r, inflection) goes through from_tome
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mctf.ToMeConfig(**kwargs)
    with pytest.raises(ValueError, match="12 blocks"):
        mctf.ToMeConfig(r=[1] * 13).schedule(12)


def test_from_tome_errors():
    with pytest.raises(ValueError, match=r"already sets the inflection"):
        mctf.ToMeConfig.from_tome((16, -1.0), inflection=0.5)
    with pytest.raises(ValueError, match=r"\(r, inflection\)"):
        mctf.ToMeConfig.from_tome((16, -1.0, 2))
    assert mctf.ToMeConfig.from_tome(8, inflection=0.5) == mctf.ToMeConfig(r=8, inflection=0.5)


def test_tome_r_clamp():
    assert mk.tome_tokens_to_remove(197, 16, 1) == 16
    assert mk.tome_tokens_to_remove(21, 16, 1) == 10  # half the mergeable tokens
    assert mk.tome_tokens_to_remove(12, 4, 1) == 4  # no "T - r < 10" rule (MCTF's gives 2)
    assert mk.tokens_to_remove(12, 4, 1) == 2
    assert mk.tome_tokens_to_remove(2, 5, 1) == 0
    with pytest.raises(TypeError):
        mk.tome_tokens_to_remove(197, 0.5, 1)


# ---------------------------------------------------------------- the op
def test_cosine_score_is_the_raw_cosine():
    x = torch.randn(2, 11, 8)
    m = x / x.norm(dim=-1, keepdim=True)
    want = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
    got = mk.scores_reference(x, score="cosine", num_protected=2, tau_sim=3.0)
    assert torch.isinf(got[:, 0]).all() and torch.isinf(got[:, :, 0]).all()
    torch.testing.assert_close(got[:, 1:, 1:], want[:, 1:, 1:], rtol=0, atol=1e-6)
    assert (got[:, 1:, 1:] < 0).any()  # negative cosines are kept, not mapped to [0, 1]


def test_cosine_order_differs_from_mctf_similarity():
    """(cos + 1) / 2 rounds nearby cosines together; the raw cosine keeps them apart."""
    x = torch.randn(1, 1, 64) + 1e-4 * torch.randn(1, 41, 64)
    with mk.use_backend("reference"):
        raw = mk.match(x, 20, num_protected=0, bidirectional=False, score="cosine")
        mapped = mk.match(x, 20, tau_info=0, tau_size=0, num_protected=0, bidirectional=False)
    assert not torch.equal(raw, mapped)


def test_cosine_score_errors():
    x = torch.randn(1, 9, 4)
    with pytest.raises(ValueError, match="neither attn_received nor size"):
        mk.match(x, 2, size=torch.ones(1, 9), score="cosine")
    with pytest.raises(ValueError, match="score must be one of"):
        mk.match(x, 2, score="tome")


# ---------------------------------------------------------------- the patch
def _vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    base = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    base.update(kw)
    return VisionTransformer(**base).eval()


FAMILIES = {
    "deit": dict(),
    "layer_scale": dict(init_values=0.5),
    "qk_norm": dict(qk_norm=True),
    "registers": dict(reg_tokens=4, no_embed_class=True),
    "avg_pool": dict(global_pool="avg", class_token=False),
    "avg_pool_cls": dict(global_pool="avg", fc_norm=True),
    "img_48": dict(img_size=48),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_families(family):
    model = _vit(**FAMILIES[family])
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        plain = model(x)
    config = mctf.ToMeConfig(r=6, trace_source=True)
    mctf.patch.timm(model, config)
    assert all(type(b) is ToMeBlock for b in model.blocks)
    with mk.use_backend("reference"), torch.no_grad():
        out = model(x)
        zero = mctf.patch.timm(model, config.replace(r=0))(x)
    torch.testing.assert_close(zero, plain, rtol=1e-5, atol=1e-5)  # r = 0: the plain model
    state = model.mctf_state
    T = model.patch_embed.num_patches + model.num_prefix_tokens
    assert out.shape == plain.shape and torch.isfinite(out).all()
    mctf.patch.timm(model, config)
    with mk.use_backend("reference"), torch.no_grad():
        model(x)
    assert state is not model.mctf_state
    state = model.mctf_state
    assert state.tokens_per_block == state.planned_tokens(T)
    assert state.tokens_per_block[-1] < T
    n_p = model.num_prefix_tokens
    # prefix tokens stay alone, in order, at the front; sizes count every input token once
    assert torch.equal(state.source[:, :n_p, :n_p], torch.eye(n_p).expand(2, n_p, n_p))
    assert torch.equal(state.size.sum(dim=1), torch.full((2,), float(T)))
    assert torch.equal(state.source.sum(dim=2), state.size)
    mctf.unpatch(model)
    assert type(model.blocks[0]).__name__ == "Block" and not hasattr(model, "mctf_state")
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain)


def test_layer_scale_and_metric_are_timm_s():
    """The ToMe block runs timm's layer scale and q/k norm: with r = 0 it is the plain block,
    and the metric is the normed keys averaged over heads."""
    model = _vit(init_values=0.3, qk_norm=True, depth=1)
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    orig = mk.match

    def spy(metric, r, *args, **kw):
        seen["metric"], seen["kw"] = metric, kw
        return orig(metric, r, *args, **kw)

    blk = model.blocks[0]
    tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    B, T, C = tokens.shape
    qkv = blk.attn.qkv(blk.norm1(tokens)).reshape(B, T, 3, 2, C // 2).permute(2, 0, 3, 1, 4)
    keys = blk.attn.k_norm(qkv[1]).mean(dim=1)
    mctf.patch.timm(model, mctf.ToMeConfig(r=4))
    import mctf.patch.tome as tome_module

    tome_module.mk.match = spy
    try:
        with mk.use_backend("reference"), torch.no_grad():
            model(x)
    finally:
        tome_module.mk.match = orig
    torch.testing.assert_close(seen["metric"], keys)
    assert seen["kw"] == dict(num_protected=1, bidirectional=False, score="cosine", return_slots=True)


def test_distilled_keeps_both_prefix_tokens():
    from timm.models.deit import VisionTransformerDistilled

    model = VisionTransformerDistilled(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                                       num_classes=5).eval()
    mctf.patch.timm(model, mctf.ToMeConfig(r=10, trace_source=True))
    with mk.use_backend("reference"), torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    s = model.mctf_state
    assert s.tokens_per_block == [56, 46, 36]
    assert torch.equal(s.size[:, :2], torch.ones(2, 2))


def test_repatch_pickle_and_mctf_switch():
    model = _vit()
    x = torch.randn(1, 3, 32, 32)
    mctf.patch.timm(model, mctf.ToMeConfig(r=5))
    mctf.patch.timm(model, mctf.MCTFConfig(r=5, layers=(1, 2)))  # switching method re-patches every block
    assert type(model.blocks[0]) is mctf.patch.MCTFBlock
    mctf.patch.timm(model, mctf.ToMeConfig(r=5))
    assert type(model.blocks[0]) is ToMeBlock and isinstance(model.mctf_state, mctf.ToMeState)
    with mk.use_backend("reference"), torch.no_grad():
        want = model(x)
        again = pickle.loads(pickle.dumps(model))
        torch.testing.assert_close(again(x), want)
    assert again.mctf_state.tokens_per_block == [60, 55, 50, 45]
    with pytest.raises(TypeError, match="MCTFConfig or mctf.ToMeConfig"):
        mctf.patch.timm(model, {"r": 5})


def test_training_backward():
    model = _vit(drop_path_rate=0.1).train()
    mctf.patch.timm(model, mctf.ToMeConfig(r=6))
    with mk.use_backend("reference"):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_finetune_loss_with_tome():
    """ToMe has no teacher-r range: finetune_loss says what to pass instead of an AttributeError;
    with an explicit teacher r (or the plain loss) it trains."""
    from mctf.training import finetune_loss

    model = mctf.patch.timm(_vit(), mctf.ToMeConfig(r=6)).train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    with mk.use_backend("reference"):
        with pytest.raises(ValueError, match="ToMeConfig has no r_teacher_max.*pass r_teacher"):
            finetune_loss(model, x, y, task_type=(1, 1, 0))
        out = finetune_loss(model, x, y, task_type=(1, 1, 0.1), r_teacher=2)
        assert out.r_teacher == 2 and model.mctf_state.r_override is None
        plain = finetune_loss(model, x, y, task_type=(1, 0, 0))
    assert plain.teacher_logits is None and torch.isfinite(out.loss) and torch.isfinite(plain.loss)
    out.loss.backward()


# ---------------------------------------------------------------- compile, CUDA graphs, half precision
ON_CUDA = torch.cuda.is_available()


def _tome_tiny(device, dtype=torch.float32, r=16):
    import timm

    kw = dict(num_classes=10) if ON_CUDA else dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3,
                                                   num_classes=10)
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, **kw)
    return mctf.patch.timm(model, mctf.ToMeConfig(r=r if ON_CUDA else 6)).to(device=device, dtype=dtype).eval()


@pytest.mark.slow
def test_torch_compile_fullgraph_reference():
    model = _tome_tiny("cuda" if ON_CUDA else "cpu")
    images = torch.randn(2, 3, *model.patch_embed.img_size, device=next(model.parameters()).device)
    with torch.no_grad(), mk.use_backend("reference"):
        want = model(images)
        got = torch.compile(model, fullgraph=True, backend="inductor" if ON_CUDA else "aot_eager")(images)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not ON_CUDA, reason="half-precision Triton models, torch.compile of Triton ops and CUDA graphs need CUDA")
def test_cuda_half_compile_and_graph_capture():
    """fp16 ToMe on the kernels: the same token counts as the reference and logits within the
    model's own half-vs-fp32 error; torch.compile(fullgraph) and a CUDA graph replay agree."""
    model = _tome_tiny("cuda", torch.float16)
    images = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        with mk.use_backend("reference"):
            ref = model(images).float()
        with mk.use_backend("triton"):
            got = model(images).float()
            compiled = torch.compile(model, fullgraph=True)(images).float()
        fp32 = _tome_tiny("cuda")(images.float())
    budget = (ref - fp32).abs().max().item()
    assert (got - ref).abs().max().item() <= 3 * budget + 1e-2
    torch.testing.assert_close(compiled, got, rtol=2e-2, atol=2e-2)
    with torch.no_grad(), mk.use_backend("triton"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(images)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(images)
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), got, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["registers", "layer_scale", "qk_norm", "avg_pool"])
def test_triton_equals_reference_on_families(family, monkeypatch):
    """Every merging block launches one match (which also gives the slot index) and one merge kernel; the
    kernels give the reference's token counts, sizes and sources exactly and its logits to
    float32 rounding (the interpreter on CPU)."""
    from mctf_kernels.triton import LAUNCHERS

    model = _vit(**FAMILIES[family])
    mctf.patch.timm(model, mctf.ToMeConfig.from_tome((10, -1.0), trace_source=True))  # r = 20, 13, 6, 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), mk.use_backend("reference"):
        want = model(x)
    s = model.mctf_state  # the same object after the next forward: keep its values
    ref_tokens, ref_size, ref_source = list(s.tokens_per_block), s.size.clone(), s.source.clone()
    calls = []
    for name, fn in list(LAUNCHERS.items()):
        monkeypatch.setitem(LAUNCHERS, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    with torch.no_grad(), mk.use_backend("triton"):
        got = model(x)
    state = model.mctf_state
    merging = sum(1 for r in state.schedule if r > 0)
    assert merging == 3 and sorted(calls) == sorted(["match", "merge"] * merging)
    T = model.patch_embed.num_patches + model.num_prefix_tokens
    assert state.tokens_per_block == ref_tokens == state.planned_tokens(T)
    assert T - ref_tokens[-1] == 20 + 13 + 6
    assert torch.equal(state.size, ref_size) and torch.equal(state.source, ref_source)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
