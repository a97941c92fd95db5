"""Public op API. Each op checks its arguments once, here, before dispatch (so neither
backend repeats the checks), reports the kernels' limits to ``dispatch`` as reasons, then
runs the chosen backend (Triton launcher or the eager reference beside it).

Structural checks (shapes, dtypes, devices, Python numbers) always run and cost no host
synchronisation. Value checks (slot ranges, positive sizes, finite inputs) synchronise,
so they run only with ``validate=True`` or ``MCTF_VALIDATE=1`` (docs/algorithm.md,
"Accepted inputs"). A batch of 0 images returns empty results on every backend.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import dispatch
from ._checks import (
    MATCH_MAX_TOKENS,
    check_attention,
    check_count,
    check_dest,
    check_dest_values,
    check_finite,
    check_heads,
    check_output_operands,
    check_per_token,
    check_pooling,
    check_received,
    check_same_device_dtype,
    check_scale,
    check_sizes_positive,
    check_slot_index,
    check_source,
    check_temperature,
    check_tokens,
    validation_requested,
)
from .attention import (
    FusionAttention,
    attention_received_reference,
    fused_attention_output_qk_reference,
    fused_attention_output_reference,
    fusion_attention_reference,
    fusion_attention_rows_reference,
)
from .match import _check_r, match_reference
from .merge import MergeNorm, merge_norm_reference, merge_reference, merge_residual_reference
from .slots import SlotIndex, slot_index_reference
from .scores import check_score

_MAX_POOLING_REASON = "max pooling (mode 2) forms P' (no fused kernel)"


def _interpreter_bf16_reason(device: torch.device, tensors: Sequence[Optional[torch.Tensor]]) -> Optional[str]:
    """Triton's interpreter computes bf16 ``tl.dot`` wrongly: never run bf16 through it."""
    if not dispatch.interpreter_enabled():
        return None
    bf16 = any(t is not None and t.dtype == torch.bfloat16 for t in tensors)
    if not bf16 and device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        bf16 = torch.get_autocast_dtype(device.type) == torch.bfloat16
    return "the Triton interpreter (TRITON_INTERPRET=1) computes bf16 dots wrongly" if bf16 else None


def _reasons(*reasons: Optional[str]) -> Optional[str]:
    """Kernel limits for this call, as one reason for dispatch (None: the kernel can run)."""
    given = [r for r in reasons if r]
    return "; ".join(given) if given else None


def match(
    x: torch.Tensor,
    r: int,
    attn_received: Optional[torch.Tensor] = None,
    size: Optional[torch.Tensor] = None,
    *,
    tau_sim: float = 1.0,
    tau_info: float = 20.0,
    tau_size: float = 40.0,
    num_protected: int = 1,
    bidirectional: bool = True,
    score: str = "mctf",
    validate: Optional[bool] = None,
    return_slots: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Optional[SlotIndex]]]:
    """Multi-criteria score + bipartite matching. Returns the slot map ``dest`` (B, T)
    int64; the fused output has ``T - r`` tokens (``r`` as from ``tokens_to_remove``).

    ``return_slots=True``: returns ``(dest, slots)``, ``slots`` being what
    ``shared_slot_index(dest, T - r)`` gives, to pass as ``slots=`` to ``merge`` and the
    attention outputs: None where the slot index would run as the reference (the
    references pool by ``dest``); on the Triton path the matcher writes it in its own
    launch for T <= 256, so a fused layer launches no slot-index kernel.

    ``score="cosine"`` scores pairs by the raw cosine of ``x`` alone (Token Merging's
    score; ``x`` is then its metric, e.g. the keys averaged over heads): the
    temperatures are not used and ``attn_received``/``size`` must be None. With
    ``bidirectional=False`` and ``r`` from ``tome_tokens_to_remove`` this is ToMe's
    matching, token order included (docs/algorithm.md, "ToMe mode").

    ``validate`` (default ``$MCTF_VALIDATE``): also check that ``x``, ``attn_received``
    and ``size`` are finite and sizes positive (a host sync). See docs/algorithm.md,
    "Accepted inputs".
    """
    check_tokens("x", x)
    B, T, _ = x.shape
    check_count("num_protected", num_protected, 0, T)
    _check_r(r, T, num_protected)
    check_per_token("attn_received", attn_received, B, T, x.device)
    check_per_token("size", size, B, T, x.device)
    for name, tau in (("tau_sim", tau_sim), ("tau_info", tau_info), ("tau_size", tau_size)):
        check_temperature(name, tau)
    check_score(score)
    if not isinstance(return_slots, bool):
        raise TypeError(f"return_slots must be a bool, got {return_slots!r}")
    if score == "cosine" and (attn_received is not None or size is not None):
        raise ValueError("score='cosine' uses neither attn_received nor size: pass None")
    if validation_requested(validate):
        check_finite("x", x)
        check_received("attn_received", attn_received)
        check_sizes_positive("size", size)
    kwargs = dict(tau_sim=tau_sim, tau_info=tau_info, tau_size=tau_size,
                  num_protected=num_protected, bidirectional=bool(bidirectional), score=score)
    limit = f"the Triton match kernel takes T <= {MATCH_MAX_TOKENS} tokens, got T={T}" if T > MATCH_MAX_TOKENS else None
    launcher = dispatch.select(
        "match", x.device, _reasons(limit, _interpreter_bf16_reason(x.device, (x, attn_received, size))))
    if launcher is None or B == 0:  # no image: the reference's empty map, on every backend
        dest = match_reference(x, r, attn_received, size, **kwargs)
        return (dest, shared_slot_index(dest, T - r)) if return_slots else dest
    if return_slots:
        return launcher(x, r, attn_received, size, **kwargs, return_slots=True)
    return launcher(x, r, attn_received, size, **kwargs)


def slot_index(dest: torch.Tensor, t_out: int) -> SlotIndex:
    """The members of each output slot of ``dest`` (B, T): ``SlotIndex(order (B, T), starts
    (B, T'+1))``, int64; slot o holds ``order[b, starts[b, o]:starts[b, o+1]]`` in ascending
    token order. Tokens with a slot outside [0, T') are in none (listed last). Compute it
    once per slot map and pass it as ``slots=`` to ``merge`` and the attention outputs."""
    if not isinstance(dest, torch.Tensor) or dest.dim() != 2 or dest.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"dest must be an int64 or int32 tensor of shape (B, T), got {getattr(dest, 'shape', dest)!r}")
    if isinstance(t_out, bool) or not isinstance(t_out, int) or t_out < 0:
        raise ValueError(f"t_out must be a non-negative int, got {t_out!r}")
    launcher = dispatch.select("slot_index", dest.device)
    if launcher is None:
        return slot_index_reference(dest, t_out)
    return launcher(dest, t_out)


def shared_slot_index(dest: torch.Tensor, t_out: int) -> Optional[SlotIndex]:
    """``slot_index(dest, t_out)`` to pass as ``slots=`` to several ops, or None when the
    slot index would run as the reference: then the ops run their references too (the
    model layer's case), which pool by ``dest`` and never read ``slots``, so the sort is
    skipped. Decided from the backend and device alone (no host sync); results are the
    same either way (a Triton launcher given ``slots=None`` computes the index itself)."""
    if dispatch.select("slot_index", dest.device) is None:
        return None
    return slot_index(dest, t_out)


def merge(
    x: torch.Tensor,
    dest: torch.Tensor,
    t_out: int,
    size: Optional[torch.Tensor] = None,
    attn_received: Optional[torch.Tensor] = None,
    *,
    mode: int = 1,
    source: Optional[torch.Tensor] = None,
    slots: Optional[SlotIndex] = None,
    validate: Optional[bool] = None,
    norm: Optional[MergeNorm] = None,
    residual: Optional[torch.Tensor] = None,
    residual_scale: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, ...]:
    """Pool tokens sharing a slot. Returns (x' (B, T', C), size' (B, T') float32,
    source' (B, T', N) or None), and with ``norm`` a fourth item, LayerNorm(x') in
    ``norm.dtype``: (B, T', C), or with ``norm.at_tokens`` (B, T, C), row t being its slot
    dest[t]'s (zeros for a token whose slot is outside [0, T')). The Triton path computes it
    in the merge's own pass when no gradient is needed (docs/algorithm.md, "One-step-ahead
    attention"). ``size=None`` means all ones.

    Residual epilogue (weighted modes 0, 1, 3): with ``residual`` (B, T', C) the first item is
    ``residual + residual_scale * x'`` instead (``residual_scale`` (C,), e.g. timm's
    LayerScale gamma, or None for no scale), rounded as the eager ops would round it
    (``merge_residual_reference``), and ``norm`` normalises that sum. A slot's weights sum to 1,
    so merging the rows of an affine map (a projection) equals the map of the merged rows.

    A slot whose pooling weights sum to exactly 0 (e.g. every member received 0.0
    attention) is the unweighted mean of its members; a NaN or inf in a token reaches
    only its own slot's row (docs/algorithm.md, "Accepted inputs"). ``validate``
    (default ``$MCTF_VALIDATE``): also check ``dest``'s values (in [0, t_out), every slot
    used), positive sizes and finite inputs (a host sync). ``slots``: ``slot_index(dest,
    t_out)`` when already computed (the reference does not need it).
    """
    check_tokens("x", x)
    B, T, _ = x.shape
    check_dest(dest, B, T, t_out, x.device)
    check_per_token("size", size, B, T, x.device)
    check_per_token("attn_received", attn_received, B, T, x.device)
    check_pooling(mode)
    if mode == 1 and attn_received is None:
        raise ValueError("merge mode 1 (attention-and-size pooling) needs attn_received")
    check_source(source, B, T, x.device)
    check_slot_index(slots, B, T, t_out, x.device)
    _check_merge_norm(norm, x)
    _check_merge_residual(residual, residual_scale, x, t_out, mode)
    if validation_requested(validate):
        check_dest_values(dest, t_out)
        check_finite("x", x)
        check_sizes_positive("size", size)
        check_received("attn_received", attn_received)
    launcher = dispatch.select("merge", x.device, _interpreter_bf16_reason(
        x.device, (x, size, attn_received, source, residual, residual_scale)))
    if launcher is None or B == 0:
        merged = merge_reference(x, dest, t_out, size, attn_received, mode=mode, source=source)
        if residual is not None:
            merged = (merge_residual_reference(merged[0], residual, residual_scale), *merged[1:])
        return merged if norm is None else (*merged, merge_norm_reference(merged[0], norm, dest))
    extra = {}  # only what is given: a launcher without the epilogues still takes a plain call
    if norm is not None:
        extra["norm"] = norm
    if residual is not None:
        extra.update(residual=residual, residual_scale=residual_scale)
    return launcher(x, dest, t_out, size, attn_received, mode=mode, source=source, slots=slots, **extra)


def _check_merge_norm(norm: Optional[MergeNorm], x: torch.Tensor) -> None:
    if norm is None:
        return
    if not isinstance(norm, MergeNorm):
        raise TypeError(f"norm must be an mctf_kernels.MergeNorm, got {type(norm).__name__}")
    C = x.shape[-1]
    for name, t in (("norm.weight", norm.weight), ("norm.bias", norm.bias)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (C,) or t.device != x.device or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating ({C},) tensor on {x.device}")
    if not isinstance(norm.eps, (int, float)) or isinstance(norm.eps, bool) or not 0 <= norm.eps < float("inf"):
        raise ValueError(f"norm.eps must be a finite number >= 0, got {norm.eps!r}")
    if norm.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"norm.dtype must be a floating dtype, got {norm.dtype}")
    if not isinstance(norm.at_tokens, bool):
        raise TypeError(f"norm.at_tokens must be a bool, got {norm.at_tokens!r}")


def _check_merge_residual(residual, residual_scale, x: torch.Tensor, t_out: int, mode: int) -> None:
    if residual is None:
        if residual_scale is not None:
            raise ValueError("residual_scale needs residual")
        return
    if mode == 2:
        raise ValueError("residual= needs a weighted pooling mode (0, 1, 3); max pooling (mode 2) has no residual "
                         "epilogue (a maximum does not commute with the projection before it)")
    B, _, C = x.shape
    if not isinstance(residual, torch.Tensor) or not residual.is_floating_point():
        raise TypeError(f"residual must be a floating tensor, got {type(residual).__name__}")
    if tuple(residual.shape) != (B, t_out, C) or residual.device != x.device:
        raise ValueError(f"residual must have shape (B, T', C) = ({B}, {t_out}, {C}) on {x.device}, "
                         f"got {tuple(residual.shape)} on {residual.device}")
    if residual_scale is not None and (not isinstance(residual_scale, torch.Tensor)
                                       or not residual_scale.is_floating_point()):
        raise TypeError(f"residual_scale must be a floating tensor or None, got {type(residual_scale).__name__}")
    if residual_scale is not None and (tuple(residual_scale.shape) != (C,) or residual_scale.device != x.device):
        raise ValueError(f"residual_scale must be a floating ({C},) tensor on {x.device} or None")


def attention_received(attn: torch.Tensor, *, validate: Optional[bool] = None) -> torch.Tensor:
    """Mean attention each key receives over heads and queries: (B, H, T, T) -> (B, T) float32."""
    check_attention("attn", attn)
    if validation_requested(validate):
        check_finite("attn", attn)
    launcher = dispatch.select("attention_received", attn.device, _interpreter_bf16_reason(attn.device, (attn,)))
    if launcher is None or attn.shape[0] == 0:
        return attention_received_reference(attn)
    return launcher(attn)


def _check_output_args(B: int, H: int, T: int, v, dest, t_out, size, attn_received, mode, device) -> None:
    """Arguments of the two P' @ V' ops (from P, or from q and k)."""
    check_heads("v", v)
    check_output_operands(B, H, T, v, dest, t_out, size, attn_received, device)
    check_pooling(mode)
    if mode == 1 and attn_received is None:
        raise ValueError("mode 1 (attention-and-size pooling) needs attn_received")


def fused_attention_output(
    attn: torch.Tensor,
    v: torch.Tensor,
    dest: torch.Tensor,
    t_out: int,
    size: Optional[torch.Tensor] = None,
    attn_received: Optional[torch.Tensor] = None,
    *,
    mode: int = 1,
    slots: Optional[SlotIndex] = None,
    validate: Optional[bool] = None,
) -> torch.Tensor:
    """One-step-ahead attention output P' @ V' (B, H, T', D) without forming P'
    (except max pooling, whose P' does not factor).

    Query rows are pooled as ``merge`` pools tokens: a slot whose weights sum to 0 takes
    the unweighted mean of its members' rows; a NaN in row q of P reaches only output row
    ``dest[q]`` (a NaN in V' reaches every row: every query reads every value).
    ``validate`` (default ``$MCTF_VALIDATE``): also check ``dest``'s values, positive
    sizes and finite inputs (a host sync). ``slots`` as in ``merge``. See docs/algorithm.md, "Accepted inputs".
    """
    check_attention("attn", attn)
    B, H, T, _ = attn.shape
    _check_output_args(B, H, T, v, dest, t_out, size, attn_received, mode, attn.device)
    check_slot_index(slots, B, T, t_out, attn.device)
    if validation_requested(validate):
        check_dest_values(dest, t_out)
        check_finite("attn", attn)
        check_finite("v", v)
        check_sizes_positive("size", size)
        check_received("attn_received", attn_received)
    reason = _reasons(_MAX_POOLING_REASON if mode == 2 else None,
                      _interpreter_bf16_reason(attn.device, (attn, v, size, attn_received)))
    launcher = dispatch.select("fused_attention_output", attn.device, reason)
    if launcher is None or B == 0:
        return fused_attention_output_reference(attn, v, dest, t_out, size, attn_received, mode=mode)
    return launcher(attn, v, dest, t_out, size, attn_received, mode=mode, slots=slots)


def fusion_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    log_size: Optional[torch.Tensor] = None,
    size: Optional[torch.Tensor] = None,
    mode: int = 1,
    validate: Optional[bool] = None,
) -> FusionAttention:
    """The attention of a one-step-ahead block before fusion: softmax(q k^T * scale [+ log s]).

    Returns a ``FusionAttention`` whose ``received`` (B, T) drives matching; pass it to
    ``fused_attention_output_from`` after merging, or give ``fusion_attention_rows`` the
    values at the token rows. The Triton path keeps only q, k and per-query
    log-sum-exps (flash-style); the reference forms P. Proportional attention takes the
    token sizes as ``size`` (B, T) or their log as ``log_size``, not both; given ``size``,
    the Triton kernel takes the log itself and the result's ``mask`` is the output
    attention's additive mask, log(size) in q's dtype as a (B, 1, 1, T) view (docs/algorithm.md,
    "One-step-ahead attention"; the kernel's log may differ from ``torch.log`` in the last
    bit). ``mode`` is the pooling mode the output will use (max pooling needs P formed).
    ``validate`` (default ``$MCTF_VALIDATE``): also check that q, k and log_size are finite
    and sizes positive (a host sync).
    """
    check_heads("q", q)
    check_heads("k", k)
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    check_same_device_dtype("k", k, "q", q)
    B, _, T, _ = q.shape
    if log_size is not None and size is not None:
        raise ValueError("pass the token sizes as size= or their log as log_size=, not both")
    check_per_token("log_size", log_size, B, T, q.device)
    check_per_token("size", size, B, T, q.device)
    check_pooling(mode)
    check_scale(scale)
    if validation_requested(validate):
        check_finite("q", q)
        check_finite("k", k)
        check_finite("log_size", log_size)
        check_sizes_positive("size", size)
    reason = _reasons(_MAX_POOLING_REASON if mode == 2 else None,
                      _interpreter_bf16_reason(q.device, (q, k, log_size, size)))
    launcher = dispatch.select("fusion_attention", q.device, reason)
    if launcher is None or B == 0:
        return fusion_attention_reference(q, k, scale=float(scale), log_size=log_size, size=size)
    if size is None:  # the launcher's signature before sizes (callers that replace it keep working)
        return launcher(q, k, scale=float(scale), log_size=log_size)
    return launcher(q, k, scale=float(scale), size=size)


def fusion_attention_rows(
    att: FusionAttention, v: torch.Tensor, *, validate: Optional[bool] = None
) -> torch.Tensor:
    """The attention's output rows over the pre-fusion keys, softmax(q k^T * scale [+ log s]) @ v,
    (B, H, T, D): ``att`` from ``fusion_attention``, ``v`` (B, H, T, D) the values at the T
    token rows (in the model each token's slot value, so that the row merge of the result
    is P' @ V'; docs/algorithm.md, "One-step-ahead attention"). When ``att`` kept q and k
    (the Triton path), torch's fused attention computes it with ``att.mask`` as its
    additive mask (log(size) in q's dtype; sizes given as ``size=``, or log_size rounded to
    q's dtype); when ``att`` formed P (the reference), P @ v. ``v`` has q's dtype and device.
    ``validate`` (default ``$MCTF_VALIDATE``): also check that ``v`` is finite (a host sync).
    """
    if not isinstance(att, FusionAttention):
        raise TypeError(f"att must be the FusionAttention from fusion_attention, got {type(att).__name__}")
    like = att.probs if att.probs is not None else att.q
    check_heads("v", v)
    B, H, T = like.shape[:3]
    if tuple(v.shape[:3]) != (B, H, T):
        raise ValueError(f"v must have shape (B, H, T, D) = ({B}, {H}, {T}, D), got {tuple(v.shape)}")
    # torch's attention takes q, k, v of one dtype; the reference's P has q's dtype too, and
    # both backends refuse the same inputs
    check_same_device_dtype("v", v, "q", like)
    if validation_requested(validate):
        check_finite("v", v)
    if att.probs is not None or B == 0:
        return fusion_attention_rows_reference(att, v)
    mask = att.mask
    if mask is None and att.log_size is not None:  # built from log_size: the reference's rounding
        mask = att.log_size.to(att.q.dtype)[:, None, None, :]
    return F.scaled_dot_product_attention(att.q, att.k, v, attn_mask=mask, scale=att.scale)


def fused_attention_output_from(
    att: FusionAttention,
    v: torch.Tensor,
    dest: torch.Tensor,
    t_out: int,
    size: Optional[torch.Tensor] = None,
    *,
    mode: int = 1,
    slots: Optional[SlotIndex] = None,
    validate: Optional[bool] = None,
) -> torch.Tensor:
    """One-step-ahead output P' @ V' (B, H, T', D) from ``fusion_attention``'s result,
    with ``fused_attention_output``'s pooling, zero-weight and NaN rules.
    ``slots`` as in ``merge``."""
    if not isinstance(att, FusionAttention):
        raise TypeError(f"att must be the FusionAttention from fusion_attention, got {type(att).__name__}")
    if att.probs is not None:
        return fused_attention_output(att.probs, v, dest, t_out, size, att.received, mode=mode, slots=slots, validate=validate)
    B, H, T, _ = att.q.shape
    _check_output_args(B, H, T, v, dest, t_out, size, att.received, mode, att.q.device)
    check_slot_index(slots, B, T, t_out, att.q.device)
    if validation_requested(validate):
        check_dest_values(dest, t_out)
        check_finite("v", v)
        check_sizes_positive("size", size)
    reason = _reasons(_MAX_POOLING_REASON if mode == 2 else None,
                      _interpreter_bf16_reason(v.device, (att.q, att.k, v, size)))
    launcher = dispatch.select("fused_attention_output_qk", v.device, reason)
    args = (att.q, att.k, att.lse, att.logits_bias(), att.scale, v, dest, t_out, size, att.received)
    if launcher is None or B == 0:
        return fused_attention_output_qk_reference(*args, mode=mode)
    return launcher(*args, mode=mode, slots=slots)
