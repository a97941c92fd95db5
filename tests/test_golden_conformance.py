"""Conformance with the paper's public code: logits, token counts, sizes and
sources it produced (tests/data/golden, made by running the public code on CPU in
fp32 with the stored random weights) must be reproduced by the patched timm model.

The weights are random but scaled so attention is peaky (mean max probability
~0.27), so the informativeness criterion really decides merges.
"""
import functools
import os

import pytest
import torch
from torch import nn

import mctf

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden", "mctf_public_tiny.pt")
REL_TOL = 1e-4  # relative max logit error allowed (fp32)


@functools.lru_cache(maxsize=1)
def golden():
    return torch.load(GOLDEN, weights_only=True)


def build_model():
    from timm.models.vision_transformer import VisionTransformer

    data = golden()
    model = VisionTransformer(**data["model_kwargs"], norm_layer=functools.partial(nn.LayerNorm, eps=data["norm_eps"]))
    model.load_state_dict(data["state_dict"], strict=True)
    return model.eval()


def config_for(case) -> mctf.MCTFConfig:
    config = mctf.MCTFConfig.from_mctf_type(case["mctf_type"], activate_layer=case["activate_layer"])
    if case["r_eval"] is not None:  # the public code's --r_evals overrides r at evaluation
        config = config.replace(r=case["r_eval"])
    return config


def relative_error(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


CASE_NAMES = [c["name"] for c in golden()["cases"]]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_reference_backend_matches_public_code(name):
    case = next(c for c in golden()["cases"] if c["name"] == name)
    model = mctf.patch.timm(build_model(), config_for(case))
    with mctf.use_backend("reference"), torch.no_grad():
        logits = model(golden()["images"])
    assert relative_error(logits, case["logits"]) <= REL_TOL
    state = model.mctf_state
    assert state.tokens_per_block == list(case["tokens_per_block"])
    if case["final_size"] is not None:
        torch.testing.assert_close(state.size, case["final_size"][..., 0], rtol=0, atol=0)
    if case.get("source") is not None:
        assert torch.equal(state.source, case["source"].to(state.source.dtype))


def test_golden_covers_every_option():
    configs = [config_for(c) for c in golden()["cases"]]
    assert {c.pooling for c in configs} == {0, 1, 2, 3}
    assert {c.one_step_ahead for c in configs} == {0, 1, 2}
    assert {c.bidirectional for c in configs} == {True, False}
    assert {c.prop_attn for c in configs} == {True, False}
    assert any(isinstance(c.r, float) and 0 < c.r < 1 for c in configs)
    assert any(c.trace_source for c in configs)


def test_unpatched_model_matches_public_code_without_fusion():
    case = next(c for c in golden()["cases"] if c["name"] == "r0_noop")
    with torch.no_grad():
        logits = build_model()(golden()["images"])
    assert relative_error(logits, case["logits"]) <= REL_TOL
