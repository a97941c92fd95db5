"""The one-line timm patch on tiny random-init models of every supported family."""
import pytest
import timm
import torch
from torch import nn

import mctf

SMALL = dict(pretrained=False, img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=7)

FAMILIES = {
    # name: (timm model, overrides, prefix tokens)
    "deit": ("deit_tiny_patch16_224", {}, 1),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}, 2),
    "deit3_layer_scale": ("deit3_small_patch16_224", {}, 1),
    "vit_registers_avg": ("vit_base_patch16_reg4_gap_256", {}, 4),
    "vit_qk_norm": ("vit_small_patch16_224", {"qk_norm": True}, 1),
    "vit_avg_pool": ("vit_small_patch16_224", {"global_pool": "avg"}, 1),
    "vit_384": ("vit_small_patch16_384", {"img_size": 384, "patch_size": 16, "depth": 2}, 1),
}


def make(family):
    name, overrides, _ = FAMILIES[family]
    kwargs = {**SMALL, **overrides}
    model = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():  # make attention peaky and layer scale visible, so fusion matters
        for blk in model.blocks:
            blk.attn.qkv.weight[: 2 * blk.attn.qkv.in_features] *= 4
            for ls in (blk.ls1, blk.ls2):
                if hasattr(ls, "gamma"):
                    ls.gamma.fill_(0.5)
    return model


def images_for(model, batch=2):
    return torch.randn(batch, 3, *model.patch_embed.img_size)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_r_zero_equals_unpatched_and_unpatch_restores(family):
    model = make(family)
    x = images_for(model)
    with torch.no_grad():
        want = model(x)
        mctf.patch.timm(model, mctf.MCTFConfig(r=0, layers=None))
        assert torch.equal(model(x), want)
        mctf.unpatch(model)
        assert type(model).__name__ != "MCTF" + type(model).__name__
        assert not hasattr(model, "mctf_state")
        assert torch.equal(model(x), want)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("one_step_ahead", [0, 1, 2])
def test_every_family_fuses(family, one_step_ahead):
    model = make(family)
    prefix = FAMILIES[family][2]
    assert model.num_prefix_tokens == prefix
    config = mctf.MCTFConfig(r=0.3, layers=None, one_step_ahead=one_step_ahead, trace_source=True)
    mctf.patch.timm(model, config)
    x = images_for(model)
    with torch.no_grad():
        out = model(x)
    state = model.mctf_state
    T = model.patch_embed.num_patches + prefix
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert state.tokens_per_block == state.planned_tokens(T)
    assert state.tokens_per_block[-1] < T
    assert torch.equal(state.size.sum(1), torch.full((2,), float(T)))
    # prefix tokens are never merged and stay first
    assert torch.equal(state.size[:, :prefix], torch.ones(2, prefix))
    # sources: every original token in exactly one final token; prefix tokens alone
    assert torch.equal(state.source.sum(1), torch.ones(2, T))
    assert torch.equal(state.source[:, :prefix, :prefix], torch.eye(prefix).expand(2, prefix, prefix))


def test_avg_pool_is_size_weighted():
    model = mctf.patch.timm(make("vit_avg_pool"), mctf.MCTFConfig(r=8, layers=(1, 2, 3)))
    captured = {}
    model.norm.register_forward_hook(lambda m, i, o: captured.setdefault("tokens", o))
    x = images_for(model)
    with torch.no_grad():
        logits = model(x)
    tokens, size = captured["tokens"][:, 1:], model.mctf_state.size[:, 1:, None]
    pooled = (tokens * size).sum(1) / size.sum(1)
    torch.testing.assert_close(logits, model.head(model.fc_norm(pooled)))


def test_repeated_forwards_restart_state_and_batch_one_works():
    model = mctf.patch.timm(make("deit"), mctf.MCTFConfig.preset("mctf", depth=4))
    with torch.no_grad():
        a = model(images_for(model, batch=1))
        sizes = model.mctf_state.size.clone()
        b = model(images_for(model, batch=1))
    assert a.shape == b.shape == (1, 7)
    assert model.mctf_state.size.shape == sizes.shape
    assert len(model.mctf_state.tokens_per_block) == 4


def test_gradients_flow_through_fusion():
    model = mctf.patch.timm(make("deit"), mctf.MCTFConfig(r=8, layers=(1, 2)))
    model.train()
    x = images_for(model)
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_patch_twice_replaces_config():
    model = make("deit")
    mctf.patch.timm(model, mctf.MCTFConfig(r=4, layers=(1,)))
    mctf.patch.timm(model, mctf.MCTFConfig(r=8, layers=(2,)))
    with torch.no_grad():
        model(images_for(model))
    assert model.mctf_state.tokens_per_block == [65, 65, 57, 57]
    mctf.unpatch(model)
    assert type(model) is timm.models.vision_transformer.VisionTransformer


def test_unsupported_models_get_clear_errors():
    with pytest.raises(mctf.UnsupportedModelError, match="VisionTransformer"):
        mctf.patch.timm(nn.Linear(3, 3), mctf.MCTFConfig())
    with pytest.raises(mctf.UnsupportedModelError, match="map"):
        mctf.patch.timm(timm.create_model("vit_small_patch16_224", **{**SMALL, "global_pool": "map"}), mctf.MCTFConfig())
    with pytest.raises(ValueError, match="layers \\[11\\] do not exist"):
        mctf.patch.timm(make("deit"), mctf.MCTFConfig(layers=(1, 11)))
    with pytest.raises(TypeError, match="MCTFConfig"):
        mctf.patch.timm(make("deit"), {"r": 16})
    with pytest.raises(ValueError, match="not patched"):
        mctf.unpatch(make("deit"))


# ---------------------------------------------------------------------------
# issue 9: feature extraction, saving, empty batches, presets on deep models, bf16


def test_forward_features_starts_a_fresh_state_every_call():
    model = mctf.patch.timm(make("deit"), mctf.MCTFConfig(r=8, layers=(1, 2)))
    x, other = images_for(model, batch=2), images_for(model, batch=3)
    with torch.no_grad():
        logits = model(x)
        f1 = model.forward_features(x)
        f2 = model.forward_features(x)  # a stale state would fuse the second call with the first's sizes
        assert torch.equal(f1, f2) and f1.shape == (2, 49, 32)
        assert model.mctf_state.tokens_per_block == [65, 57, 49, 49]
        torch.testing.assert_close(model.forward_head(f2), logits, rtol=0, atol=0)
        model.forward_features(other)  # another batch size right after
        assert model.mctf_state.size.shape == (3, 49)


def test_forward_head_after_forward_features_pools_by_size():
    model = mctf.patch.timm(make("vit_avg_pool"), mctf.MCTFConfig(r=8, layers=(1, 2)))
    x = images_for(model)
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), logits, rtol=0, atol=0)
        with pytest.raises(ValueError, match="forward_head got"):
            model.forward_head(torch.randn(2, 65, 32))  # not the last forward_features' tokens


def test_forward_intermediates():
    model = mctf.patch.timm(make("deit"), mctf.MCTFConfig(r=8, layers=(1, 2)))
    x = images_for(model)
    with torch.no_grad():
        want = model.forward_features(x)
        final, inter = model.forward_intermediates(x, output_fmt="NLC")
        final2, _ = model.forward_intermediates(x, output_fmt="NLC")  # twice: fresh state each time
        assert torch.equal(final, want) and torch.equal(final2, want)
        assert [t.shape[1] for t in inter] == [64, 56, 48, 48]  # patch tokens (prefix split off)
        torch.testing.assert_close(model.forward_head(final), model(x), rtol=0, atol=0)
        # before the first fusion the tokens are still a grid
        grid = model.forward_intermediates(x, indices=[0], intermediates_only=True)
        assert grid[0].shape == (2, 32, 8, 8)
        with pytest.raises(ValueError, match="output_fmt='NLC'"):
            model.forward_intermediates(x, indices=[0, 2])
    # ToMe merges from block 0 on: no grid after it, and the error names both methods
    mctf.patch.timm(model, mctf.ToMeConfig(r=4))
    with torch.no_grad(), pytest.raises(ValueError, match=r"\(MCTF or ToMe\) has merged tokens by blocks \[0\]"):
        model.forward_intermediates(x, indices=[0])


@pytest.mark.parametrize("family", ["deit", "deit_distilled"])
def test_patched_model_pickles(tmp_path, family):
    """torch.save(model) of a patched model loads back, in this process and in a fresh one."""
    import subprocess
    import sys

    model = mctf.patch.timm(make(family), mctf.MCTFConfig(r=8, layers=(1, 2), trace_source=True))
    x = images_for(model)
    with torch.no_grad():
        want = model(x)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    torch.save(x, tmp_path / "x.pt")
    loaded = torch.load(path, weights_only=False)
    assert type(loaded) is type(model) and type(loaded).__module__ == "mctf.patch.timm"
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
    assert loaded.blocks[1]._mctf_state is loaded.mctf_state  # one shared state, as patched
    torch.save(want, tmp_path / "want.pt")
    code = (
        "import sys, torch; p = sys.argv[1]; m = torch.load(p + '/model.pt', weights_only=False); "
        "x = torch.load(p + '/x.pt'); want = torch.load(p + '/want.pt'); "
        "assert type(m).__name__.startswith('MCTF'), type(m); "
        "torch.no_grad().__enter__(); assert torch.equal(m(x), want); "
        "assert m.mctf_state.source.shape[-1] == x.shape[-1] // 8 * x.shape[-2] // 8 + m.num_prefix_tokens"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
    assert type(mctf.unpatch(loaded)) is type(make(family))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("one_step_ahead", [0, 1, 2])
def test_batch_zero_returns_an_empty_batch(backend, one_step_ahead):
    model = mctf.patch.timm(make("deit"), mctf.MCTFConfig(r=8, layers=(1, 2), one_step_ahead=one_step_ahead,
                                                          trace_source=True))
    with mctf.use_backend(backend), torch.no_grad():
        out = model(images_for(model, batch=0))
        features = model.forward_features(images_for(model, batch=0))
    assert out.shape == (0, 7) and features.shape == (0, 49, 32)
    assert model.mctf_state.size.shape == (0, 49) and model.mctf_state.source.shape == (0, 49, 65)
    assert model.mctf_state.tokens_per_block == [65, 57, 49, 49]


def test_presets_follow_the_depth_of_a_24_block_model():
    deep = dict(SMALL, depth=24, embed_dim=8, num_heads=1, img_size=32)
    model = mctf.patch.timm(timm.create_model("deit_tiny_patch16_224", **deep).eval(), mctf.MCTFConfig.preset("mctf", r=2))
    assert model.mctf_config.layers == tuple(range(1, 24)) and model.mctf_state.active == frozenset(range(1, 24))
    with torch.no_grad():
        model(images_for(model))
    tokens = model.mctf_state.tokens_per_block
    assert tokens[0] == 17 and tokens[1:4] == [15, 13, 11] and len(tokens) == 24
    assert tokens == model.mctf_state.planned_tokens(17)
    fast = mctf.patch.timm(timm.create_model("deit_tiny_patch16_224", **deep).eval(), mctf.MCTFConfig.preset("mctf-fast"))
    assert fast.mctf_config.layers == (6, 12, 18)
    # the library and the CLIs agree: the CLIs pass depth explicitly
    assert model.mctf_config == mctf.MCTFConfig.preset("mctf", depth=24, r=2)


def test_bf16_under_the_interpreter_is_refused_not_wrong():
    """The interpreter computes bf16 dots wrongly: backend 'triton' refuses with the reason;
    'auto' runs the reference on CPU and matches it exactly."""
    import mctf_kernels

    if not mctf_kernels.dispatch.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 (the CPU CI); on CUDA bf16 runs the real kernels")
    model = mctf.patch.timm(make("deit"), mctf.MCTFConfig(r=8, layers=(1, 2))).to(torch.bfloat16)
    x = images_for(model).to(torch.bfloat16)
    with mctf.use_backend("triton"), torch.no_grad(), pytest.raises(mctf.BackendUnavailable, match="bf16"):
        model(x)
    with torch.no_grad():
        with mctf.use_backend("reference"):
            want = model(x)
        with mctf.use_backend("auto"):
            got = model(x)
    assert torch.isfinite(want).all() and torch.equal(got, want)
