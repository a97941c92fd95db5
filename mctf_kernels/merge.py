"""Merging tokens by slot map (docs/algorithm.md, "Pooling").

Every pooling rule is a reduction over the input tokens that share an output
slot, so a single slot map from ``match`` describes the whole two-stage merge.

Pooling modes (``mode``), weights w_t inside a slot:
  0 size-weighted: w = s;  1 attention-and-size: w = attn_m * s / max(s);
  2 elementwise max;       3 mean: w = 1.
New sizes are always the slot sums of s.

Defined results for degenerate inputs (docs/algorithm.md, "Accepted inputs"):
- a slot whose weights sum to exactly 0 (all members received 0.0 attention, or
  zero sizes) is the unweighted mean of its members, not 0/0;
- a NaN/inf reaches only the rows that read it: a token's value only its slot's row,
  a token's weight only its slot's row (the per-image ``max(s)`` of mode 1 ignores NaN:
  it cancels in the weighted mean and only keeps the weights in range).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from ._checks import check_dest, check_per_token, check_pooling, check_source

# floor of the mode-1 size normaliser (only all-zero sizes reach it)
EPS = 1e-12


def pooling_weights(
    mode: int, size: torch.Tensor, attn_received: Optional[torch.Tensor]
) -> Optional[torch.Tensor]:
    """Per-token weights (B, T) float32 for modes 0, 1, 3; None for max pooling."""
    check_pooling(mode)
    size = size if size.dtype == torch.float64 else size.float()
    if mode == 0:
        return size
    if mode == 1:
        if attn_received is None:
            raise ValueError("pooling mode 1 (attention-and-size) needs attn_received")
        # the normaliser cancels in the weighted mean: skip NaN (fmax) so one bad size does
        # not reach the whole image, and floor it so all-zero sizes do not give 0/0
        smax = size.nan_to_num(nan=0.0, posinf=float("inf")).amax(dim=1, keepdim=True).clamp_min(EPS)
        return attn_received.to(size.dtype) * (size / smax)
    if mode == 3:
        return torch.ones_like(size)
    return None


def segment_sum(values: torch.Tensor, dest: torch.Tensor, t_out: int) -> torch.Tensor:
    """Sum ``values`` (B, ..., T, C) over tokens sharing a slot -> (B, ..., t_out, C)."""
    B, T = dest.shape
    index = dest.view(B, *([1] * (values.dim() - 3)), T, 1).expand_as(values)
    out = values.new_zeros(*values.shape[:-2], t_out, values.shape[-1])
    return out.scatter_add(-2, index, values)


def segment_max(values: torch.Tensor, dest: torch.Tensor, t_out: int) -> torch.Tensor:
    B, T = dest.shape
    index = dest.view(B, *([1] * (values.dim() - 3)), T, 1).expand_as(values)
    # NaN base: never equal to a max, so amax's backward splits the gradient only among
    # the slot's real tied members (an uninitialised base could take a share)
    fill = float("nan") if values.is_floating_point() else torch.iinfo(values.dtype).min
    out = values.new_full((*values.shape[:-2], t_out, values.shape[-1]), fill)
    return out.scatter_reduce(-2, index, values, reduce="amax", include_self=False)


def merge_tokens_reference(
    x: torch.Tensor, dest: torch.Tensor, t_out: int, weights: Optional[torch.Tensor]
) -> torch.Tensor:
    """Weighted slot average of x (B, ..., T, C) with weights (B, T); max when weights is None.

    Accumulates in float32 (float64 for float64 x) and returns x's dtype; differentiable in x.
    """
    if weights is None:
        return segment_max(x, dest, t_out)
    B, T = dest.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    weights = weights.to(acc)
    den = segment_sum(weights[:, :, None], dest, t_out)[..., 0]
    # a slot whose weights sum to exactly 0 pools its members unweighted (not 0/0);
    # other slots keep their weights bit for bit
    empty = (den == 0).gather(1, dest.long())
    weights = torch.where(empty, torch.ones_like(weights), weights)
    den = torch.where(den == 0, segment_sum(empty.to(acc)[:, :, None], dest, t_out)[..., 0], den)
    w = weights.view(B, *([1] * (x.dim() - 3)), T, 1)
    num = segment_sum(x.to(acc) * w, dest, t_out)
    den = den.view(B, *([1] * (x.dim() - 3)), t_out, 1)
    return (num / den).to(x.dtype)


def merge_reference(
    x: torch.Tensor,
    dest: torch.Tensor,
    t_out: int,
    size: Optional[torch.Tensor] = None,
    attn_received: Optional[torch.Tensor] = None,
    *,
    mode: int = 1,
    source: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Eager merge: (x' (B, T', C), size' (B, T') float32, source' (B, T', N) or None).

    size None means "all ones" (before the first fusion of a forward).
    """
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, T, C), got {tuple(x.shape)}")
    B, T, _ = x.shape
    check_dest(dest, B, T, t_out, x.device)
    check_per_token("size", size, B, T, x.device)
    check_per_token("attn_received", attn_received, B, T, x.device)
    check_pooling(mode)
    dest = dest.long()
    if size is None:
        size = torch.ones(B, T, device=x.device, dtype=torch.float32)
    with torch.no_grad():
        weights = pooling_weights(mode, size, attn_received)
        new_size = segment_sum(size.float()[:, :, None], dest, t_out)[..., 0]
        new_source = None
        if source is not None:
            check_source(source, B, T, x.device)
            new_source = segment_max(source, dest, t_out)
    return merge_tokens_reference(x, dest, t_out, weights), new_size, new_source


class MergeNorm(NamedTuple):
    """A LayerNorm applied to the merged tokens in the same pass (``merge(..., norm=)``):
    ``LayerNorm(x')`` over the channels with ``weight``, ``bias`` (C,) and ``eps``, returned
    in ``dtype`` (e.g. the autocast dtype the next projection casts to).

    ``at_tokens``: return it at the input token positions, (B, T, C) with row t =
    LayerNorm(x')[dest[t]] (what a projection of the pre-fusion rows reads: each token
    gets its slot's row; a token whose slot is outside [0, T') gets zeros), instead of
    one row per slot (B, T', C) (docs/algorithm.md, "One-step-ahead attention")."""

    weight: torch.Tensor
    bias: torch.Tensor
    eps: float
    dtype: torch.dtype
    at_tokens: bool = False


def at_token_positions(rows: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """rows (B, T', C) -> (B, T, C): token t gets row dest[t]; zeros where dest[t] is not
    in [0, T') (such a token is in no slot)."""
    B, T = dest.shape
    t_out, C = rows.shape[-2:]
    dest = dest.long()
    inside = (dest >= 0) & (dest < t_out)
    picked = rows.gather(1, dest.clamp(0, max(t_out - 1, 0))[:, :, None].expand(B, T, C))
    return torch.where(inside[:, :, None], picked, torch.zeros((), dtype=rows.dtype, device=rows.device))


def merge_norm_reference(x_new: torch.Tensor, norm: MergeNorm, dest: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LayerNorm of the merged tokens x' (as stored, in x's dtype), cast to ``norm.dtype``;
    with ``norm.at_tokens`` at the token positions of ``dest`` (``at_token_positions``)."""
    normed = F.layer_norm(x_new, (x_new.shape[-1],), norm.weight, norm.bias, norm.eps).to(norm.dtype)
    if not norm.at_tokens:
        return normed
    if dest is None:
        raise ValueError("MergeNorm(at_tokens=True) needs the slot map dest")
    return at_token_positions(normed, dest)


def merge_residual_reference(
    x_new: torch.Tensor, residual: torch.Tensor, residual_scale: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The residual epilogue ``residual + residual_scale * x'`` as the eager block computes
    it (timm's LayerScale, then the residual add): x' as stored (the row merge rounded to
    its input's dtype), the product rounded to torch's result dtype of (x', scale), the sum
    to that of (residual, product). ``residual_scale`` None: no scale (``residual + x'``)."""
    scaled = x_new if residual_scale is None else x_new * residual_scale
    return residual + scaled
