"""Multi-criteria scores between the A tokens (even) and B tokens (odd)
(docs/algorithm.md, "Scores" and "Precision").

score[a, b] = W_sim * W_info * W_size, returned in float32; with ``score="cosine"``
(docs/algorithm.md, "ToMe mode") it is the raw cosine alone. Rows and columns of
protected prefix tokens are -inf so they are never a source nor a destination.
The cosine runs in ``compute_dtype(x)``: float32, or the half dtype of autocast or
of a half model, as the public code's evaluation (under CUDA autocast) computes it.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import check_per_token, check_temperature, check_tokens

# Clamp for norms and attention: a zero token or an underflowed attention
# column must give a finite score, not NaN/inf (the public code divides by 0).
EPS = 1e-12

# "mctf": the multi-criteria product; "cosine": the raw cosine of ToMe (no (cos + 1) / 2,
# no temperature, no informativeness or size factor)
SCORES = ("mctf", "cosine")


def check_score(score) -> None:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype of the similarity matmul: the autocast dtype when autocast is enabled
    for x's device type, else x's dtype if it is float16/bfloat16, else float32."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32


def informativeness(attn_received: torch.Tensor) -> torch.Tensor:
    """i = 1 / attn_m, normalised by its max over tokens (B, T), float32."""
    inv = 1.0 / attn_received.float().clamp_min(EPS)
    return inv / inv.amax(dim=1, keepdim=True)


def size_factor(size: torch.Tensor) -> torch.Tensor:
    """z = 1 / s, normalised by its max over tokens (B, T), float32."""
    inv = 1.0 / size.float()
    return inv / inv.amax(dim=1, keepdim=True)


def scores_reference(
    x: torch.Tensor,
    attn_received: Optional[torch.Tensor] = None,
    size: Optional[torch.Tensor] = None,
    *,
    tau_sim: float = 1.0,
    tau_info: float = 20.0,
    tau_size: float = 40.0,
    num_protected: int = 1,
    score: str = "mctf",
) -> torch.Tensor:
    """Eager multi-criteria score matrix (B, ceil(T/2), floor(T/2)) in float32.

    x: (B, T, C) residual stream entering fusion. attn_received: (B, T) mean
    attention each token receives, or None (informativeness off). size: (B, T)
    token sizes, or None ("no size yet": the size factor is 1). ``score="cosine"``:
    the raw cosine of x (the caller's metric, e.g. keys), computed in the same
    dtype as the MCTF similarity; the temperatures are not used and attn_received
    and size must be None.
    """
    check_tokens("x", x)
    B, T, _ = x.shape
    if T < 2:
        raise ValueError(f"x needs at least 2 tokens to split into A/B, got T={T}")
    check_per_token("attn_received", attn_received, B, T, x.device)
    check_per_token("size", size, B, T, x.device)
    for name, tau in (("tau_sim", tau_sim), ("tau_info", tau_info), ("tau_size", tau_size)):
        check_temperature(name, tau)
    if not 0 <= num_protected <= T:
        raise ValueError(f"num_protected must be in [0, T={T}], got {num_protected}")
    check_score(score)
    kind, score = score, None
    if kind == "cosine" and (attn_received is not None or size is not None):
        raise ValueError("score='cosine' uses neither attn_received nor size: pass None")

    xf = x.float()
    m = xf / xf.norm(dim=-1, keepdim=True).clamp_min(EPS)
    a, b = m[:, ::2], m[:, 1::2]
    t1, t2 = a.shape[1], b.shape[1]
    if kind == "cosine":
        cd = compute_dtype(x)
        score = torch.matmul(a.to(cd), b.to(cd).transpose(1, 2)).float()
    elif tau_sim:
        cd = compute_dtype(x)
        # Half precision: m rounded to cd, fp32-accumulated matmul rounded to cd (what
        # autocast's matmul does), then (cos + 1) / 2 and the clamp in cd, and pow in
        # float32 (an fp32 op under CUDA autocast), written out so every device and a
        # half model without autocast compute the same.
        cos = torch.matmul(a.to(cd), b.to(cd).transpose(1, 2))
        # clamp: rounding can push cos below -1, and a fractional power of a negative is NaN
        score = ((cos + 1) / 2).clamp_min(0).float() ** (1.0 / tau_sim)
    else:
        score = torch.ones(B, t1, t2, device=x.device, dtype=torch.float32)
    if tau_info and attn_received is not None:
        i = informativeness(attn_received)
        score = score * (i[:, ::2, None] * i[:, None, 1::2]) ** (1.0 / tau_info)
    if tau_size and size is not None:
        z = size_factor(size)
        score = score * (z[:, ::2, None] * z[:, None, 1::2]) ** (1.0 / tau_size)
    if num_protected:
        score[:, : (num_protected + 1) // 2, :] = float("-inf")  # protected A tokens: 0, 2, ...
        score[:, :, : num_protected // 2] = float("-inf")  # protected B tokens: 1, 3, ...
    return score
