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
