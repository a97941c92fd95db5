"""Shared by the ToMe conformance test and its generator (tests/data/make_tome_golden.py):
the models, their weights and images (made from seeds here, so the stored golden file
holds only outputs), and the configurations.

Weights do not come from timm's initialiser (which may change between timm versions):
every tensor of the state dict is drawn from its own ``torch.Generator`` seeded by the
case seed and the tensor's name, then scaled by its kind (LayerNorm weights near 1,
small biases, 1/sqrt(fan-in) matrices, O(1) position embeddings so tokens differ).
``checksum`` guards against a change in this recipe or in torch's CPU generator.
"""
from __future__ import annotations

import zlib

import torch

MODELS = {
    "tiny": "deit_tiny_patch16_224",
    "tiny_distilled": "deit_tiny_distilled_patch16_224",
    "small": "deit_small_patch16_224",
    "base": "deit_base_patch16_224",
    "small_gap": "deit_small_patch16_224",
}
# timm kwargs per model: no class token, average pooling (nothing protected; ToMe keeps the
# staying A tokens in descending score order there, so the source maps pin that order)
MODEL_KWARGS = {"small_gap": dict(class_token=False, global_pool="avg")}
PREFIX_TOKENS = {"tiny": 1, "tiny_distilled": 2, "small": 1, "base": 1, "small_gap": 0}
# ToMe's timm patch pools these by timm's plain mean, we by size (docs/algorithm.md, "ToMe mode"):
# their logits differ by design, so the final tokens before the head are compared instead
FEATURES_ONLY = {"small_gap"}
SEED = 12
BATCH = 2

# name, model, r in ToMe's own forms (int, list, (r, inflection)), prop_attn, trace_source
CASES = [
    ("tiny_r16", "tiny", 16, True, False),
    ("tiny_r16_trace", "tiny", 16, True, True),
    ("tiny_distilled_r13_trace", "tiny_distilled", 13, True, True),
    ("tiny_distilled_decreasing", "tiny_distilled", (16, -1.0), True, False),
    ("small_r13", "small", 13, True, False),
    ("small_r16", "small", 16, True, False),
    ("small_r16_noprop", "small", 16, False, False),
    ("small_r16_trace", "small", 16, True, True),
    ("small_list", "small", [20, 20, 16, 16, 8, 8, 4, 4], True, False),
    ("small_decreasing", "small", (16, -1.0), True, False),
    ("small_increasing", "small", (8, 0.5), True, True),
    ("small_r50_capped", "small", 50, True, False),
    ("small_r0", "small", 0, True, False),
    ("base_r16", "base", 16, True, False),
    ("base_r8_trace", "base", 8, True, True),
    ("base_r13_noprop", "base", 13, False, False),
    ("small_gap_r16_trace", "small_gap", 16, True, True),
]


def _seed(model_key: str, name: str) -> int:
    return SEED * 1_000_003 + zlib.crc32(f"{model_key}/{name}".encode())


def golden_state_dict(model, model_key: str) -> dict:
    out = {}
    for name, t in model.state_dict().items():
        g = torch.Generator().manual_seed(_seed(model_key, name))
        w = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if "norm" in name and t.dim() == 1:
            w = 1.0 + 0.1 * w if name.endswith("weight") else 0.1 * w
        elif name in ("cls_token", "dist_token", "pos_embed", "reg_token"):
            w = 0.5 * w
        elif t.dim() >= 2:
            w = w / t[0].numel() ** 0.5
        else:
            w = 0.05 * w
        out[name] = w.to(t.dtype)
    return out


def build_model(model_key: str):
    import timm

    model = timm.create_model(MODELS[model_key], pretrained=False, **MODEL_KWARGS.get(model_key, {})).eval()
    model.load_state_dict(golden_state_dict(model, model_key), strict=True)
    return model


def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    return torch.randn(BATCH, 3, 224, 224, generator=g)


def checksum(model) -> float:
    return float(sum(p.double().abs().sum() for p in model.state_dict().values()))


def owner_from_source(source: torch.Tensor) -> torch.Tensor:
    """(B, T', N) 0/1 source map -> (B, N) int16: the final token holding each input token
    (each input token is in exactly one)."""
    assert torch.all(source.sum(dim=1) == 1)
    return source.argmax(dim=1).to(torch.int16)
