"""Conformance with Token Merging's public code (github.com/facebookresearch/ToMe, its timm
patch): logits, token counts, sizes and sources it produced (tests/data/golden/tome_public.pt,
made by tests/data/make_tome_golden.py on CPU in fp32) must be reproduced by
``mctf.patch.timm(model, mctf.ToMeConfig...)`` on random-weight DeiT-T/S/B, distilled
DeiT-T and an average-pooled DeiT-S without a class token (there the final tokens before
the head are compared: the heads differ by design), on the reference backend and on the
Triton kernels (the interpreter on CPU).

The models, weights and images are rebuilt from seeds (tests/tome_golden.py); the stored
checksums catch a change in that recipe before any logit is compared.
"""
import functools
import os

import pytest
import torch

import mctf
import tome_golden as G

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden", "tome_public.pt")
REL_TOL = 1e-4  # relative max logit error allowed (fp32)


@functools.lru_cache(maxsize=1)
def golden():
    return torch.load(GOLDEN, weights_only=True)


@functools.lru_cache(maxsize=4)
def _weights(key):
    model = G.build_model(key)
    assert G.checksum(model) == pytest.approx(golden()["checksums"][key], rel=1e-12), (
        "the golden weights recipe or torch's CPU generator changed: regenerate the golden file")
    return model.state_dict()


def build_model(key):
    import timm

    model = timm.create_model(G.MODELS[key], pretrained=False, **G.MODEL_KWARGS.get(key, {})).eval()
    model.load_state_dict(_weights(key), strict=True)
    return model


def relative_error(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def case(name):
    return next(c for c in golden()["cases"] if c["name"] == name)


def input_tokens(name):
    return 196 + G.PREFIX_TOKENS[case(name)["model"]]


def run_case(name, backend):
    c = case(name)
    config = mctf.ToMeConfig.from_tome(c["r"], prop_attn=c["prop_attn"], trace_source=c["trace_source"])
    model = mctf.patch.timm(build_model(c["model"]), config)
    features = []
    model.norm.register_forward_hook(lambda mod, inp, out: features.append(out))
    with mctf.use_backend(backend), torch.no_grad():
        logits = model(G.images())
    state = model.mctf_state
    assert state.tokens_per_block == list(c["tokens_per_block"])
    assert state.planned_tokens(input_tokens(name)) == list(c["tokens_per_block"])
    if c["final_size"] is None:
        assert state.size is None
    else:
        torch.testing.assert_close(state.size, c["final_size"], rtol=0, atol=0)
    if c["source_owner"] is not None:
        assert torch.equal(G.owner_from_source(state.source), c["source_owner"])
    else:
        assert state.source is None
    if c["model"] in G.FEATURES_ONLY:  # size-weighted vs ToMe's plain mean head: compare the tokens before it
        assert c["features"] is not None and features[-1].shape == c["features"].shape
        err = relative_error(features[-1], c["features"])
        assert err <= REL_TOL, f"relative final-token error {err:.2e}"
        assert relative_error(logits, c["logits"]) > 1e-3  # the heads really differ: the comparison above is needed
        return err
    assert c["features"] is None
    err = relative_error(logits, c["logits"])
    assert err <= REL_TOL, f"relative logit error {err:.2e}"
    return err


CASE_NAMES = [c[0] for c in G.CASES]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_reference_backend_matches_tome(name):
    run_case(name, "reference")


@pytest.mark.parametrize("name", CASE_NAMES)
def test_triton_backend_matches_tome(name):
    from mctf_kernels.triton import match as triton_match

    before = triton_match.launch_count
    run_case(name, "triton")
    counts = case(name)["tokens_per_block"]
    merges = sum(1 for a, b in zip([input_tokens(name)] + counts, counts) if b < a)
    assert triton_match.launch_count - before == merges  # one fused match launch per merging block


def test_golden_covers_every_option():
    cases = golden()["cases"]
    assert [c["name"] for c in cases] == CASE_NAMES
    assert {c["model"] for c in cases} == set(G.MODELS)
    rs = [c["r"] for c in cases]
    assert any(isinstance(r, int) for r in rs) and any(isinstance(r, list) for r in rs)
    assert any(isinstance(r, tuple) and r[1] < 0 for r in rs) and any(isinstance(r, tuple) and r[1] > 0 for r in rs)
    assert {c["prop_attn"] for c in cases} == {True, False}
    assert any(c["trace_source"] for c in cases)
    # every decision ToMe took was far wider than float32 rounding of a cosine
    assert min(c["min_margin"] for c in cases if c["min_margin"] is not None) > 1e-5


def test_unpatched_model_matches_tome_without_merging():
    c = case("small_r0")
    with torch.no_grad():
        logits = build_model("small")(G.images())
    assert relative_error(logits, c["logits"]) <= REL_TOL
