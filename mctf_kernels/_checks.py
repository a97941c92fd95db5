"""Argument checks shared by the ops: fail early, naming the argument.

Two kinds (docs/algorithm.md, "Accepted inputs"):
- structural checks (types, ranks, shapes, dtypes, devices, Python numbers) read only
  metadata, cost no host synchronisation and always run, once per op in ``ops.py``;
- value checks (slot ranges, positive sizes, finite inputs) read tensor contents, so they
  synchronise with the host and run only when asked: ``validate=True`` on the op or
  ``MCTF_VALIDATE=1`` in the environment.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

POOLING_MODES = (0, 1, 2, 3)

# The Triton match kernel's token limit (its launcher keeps the same bound); larger
# inputs are a kernel limit reported to dispatch, not an argument error.
MATCH_MAX_TOKENS = 65_536


def check_tokens(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (B, T, C), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")


def check_heads(name: str, t, what: str = "(B, H, T, D)") -> None:
    """A floating 4-d tensor (attention probabilities, queries, keys or values)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {what}, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape {what}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")


def check_attention(name: str, attn) -> None:
    """Attention probabilities (B, H, T, T): square in the last two dimensions."""
    check_heads(name, attn, "(B, H, T, T)")
    if attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"{name} must have shape (B, H, T, T) (square), got {tuple(attn.shape)}")


def check_per_token(name: str, v, batch: int, tokens: int, device: torch.device) -> None:
    if v is None:
        return
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(v).__name__}")
    if tuple(v.shape) != (batch, tokens):
        raise ValueError(f"{name} must have shape (B, T) = ({batch}, {tokens}), got {tuple(v.shape)}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device} but the tokens are on {device}")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {v.dtype}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite_number(v) -> bool:
    # comparisons, not math.isfinite: torch.compile may trace a number as a symbolic float
    return _is_number(v) and -math.inf < v < math.inf  # NaN fails every comparison


def check_temperature(name: str, tau: float) -> None:
    if not _is_finite_number(tau) or tau < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (0 disables the criterion), got {tau!r}")


def check_scale(scale) -> None:
    if not _is_finite_number(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")


def check_count(name: str, value, low: int, high: int) -> None:
    """A Python int (not bool, not float) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def check_pooling(mode) -> None:
    # 1.0 == 1 would pass a membership test: the kernels take the mode as a constexpr int
    if isinstance(mode, bool) or not isinstance(mode, int) or mode not in POOLING_MODES:
        raise ValueError(f"pooling mode must be an int in {POOLING_MODES}, got {mode!r}")


def check_same_device_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} and {ref_name} must have the same dtype, got {t.dtype} and {ref.dtype}")


def check_source(source, batch: int, tokens: int, device: torch.device) -> None:
    if source is None:
        return
    if not isinstance(source, torch.Tensor):
        raise TypeError(f"source must be a torch.Tensor or None, got {type(source).__name__}")
    if source.dim() != 3 or tuple(source.shape[:2]) != (batch, tokens):
        raise ValueError(f"source must have shape (B, T, N) with (B, T) = ({batch}, {tokens}), "
                         f"got {tuple(source.shape)}")
    if source.device != device:
        raise ValueError(f"source is on {source.device} but the tokens are on {device}")
    if not source.is_floating_point():
        raise TypeError(f"source must be a floating 0/1 map (e.g. the tokens' dtype), got {source.dtype}")


def check_dest(dest: torch.Tensor, batch: int, tokens: int, t_out: int, device) -> None:
    """Shape, dtype and device of a slot map. Its values must lie in [0, t_out) and
    cover every slot (``match`` guarantees it); ``validate_values`` checks them on request."""
    if not isinstance(dest, torch.Tensor) or dest.dtype not in (torch.int32, torch.int64):
        raise TypeError("dest must be an int32/int64 tensor (the slot map from match)")
    if tuple(dest.shape) != (batch, tokens):
        raise ValueError(f"dest must have shape (B, T) = ({batch}, {tokens}), got {tuple(dest.shape)}")
    if dest.device != device:
        raise ValueError(f"dest is on {dest.device} but the tokens are on {device}")
    if isinstance(t_out, bool) or not isinstance(t_out, int) or not 1 <= t_out <= tokens:
        raise ValueError(f"t_out must be an int in [1, T={tokens}], got {t_out!r}")


def check_slot_index(slots, batch: int, tokens: int, t_out: int, device) -> tuple:
    """A precomputed slot index ``(order, starts)`` (``slot_index``'s result): int32/int64
    (B, T) and (B, T'+1) on ``device``; returns it, or (None, None) for None. Its values
    are not read (a host sync): the kernels clamp every index they take from it, so wrong
    values give wrong numbers, never an access outside a tensor."""
    if slots is None:
        return None, None
    if not isinstance(slots, tuple) or len(slots) != 2:
        raise ValueError("slots must be the (order, starts) pair from mctf_kernels.slot_index")
    for name, t, shape in (("order", slots[0], (batch, tokens)), ("starts", slots[1], (batch, t_out + 1))):
        if (not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64) or tuple(t.shape) != shape
                or t.device != device):
            raise ValueError(f"slots.{name} must be int32/int64 of shape {shape} on {device}, "
                             f"got {getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}")
    return slots[0], slots[1]


def check_output_operands(batch: int, heads: int, tokens: int, v, dest, t_out, size, attn_received, device) -> None:
    """Shapes and devices of the P' @ V' operands besides the attention (B, H, T, .): what the
    kernels index by (B, H, T, T', D), so a direct launcher call with a wrong shape or device
    is an error, not an access outside a tensor."""
    if tuple(v.shape[:3]) != (batch, heads, t_out) or v.dim() != 4:
        raise ValueError(f"v must have shape (B, H, T', D) = ({batch}, {heads}, {t_out}, D), got {tuple(v.shape)}")
    if v.device != device:
        raise ValueError(f"v is on {v.device} but the attention is on {device}")
    check_dest(dest, batch, tokens, t_out, device)
    check_per_token("size", size, batch, tokens, device)
    check_per_token("attn_received", attn_received, batch, tokens, device)


# ---------------------------------------------------------------------------
# value checks: host synchronisation, only on request


def validation_requested(validate: Optional[bool]) -> bool:
    """``validate`` if given, else ``$MCTF_VALIDATE`` (unset, "" or "0" = off)."""
    if validate is not None:
        return bool(validate)
    return os.environ.get("MCTF_VALIDATE", "0").strip() not in ("", "0")


def check_finite(name: str, t: Optional[torch.Tensor]) -> None:
    if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} has {bad} non-finite (NaN or inf) value(s)")


def check_sizes_positive(name: str, size: Optional[torch.Tensor]) -> None:
    if size is None or not size.numel():
        return
    check_finite(name, size)
    if not bool((size > 0).all()):
        raise ValueError(f"{name} must be > 0 everywhere (a token holds at least one patch), "
                         f"min is {float(size.min())}")


def check_received(name: str, received: Optional[torch.Tensor]) -> None:
    if received is None or not received.numel():
        return
    check_finite(name, received)
    if not bool((received >= 0).all()):
        raise ValueError(f"{name} must be >= 0 (attention probabilities), min is {float(received.min())}")


def check_dest_values(dest: torch.Tensor, t_out: int) -> None:
    """Every slot id in [0, t_out) and every slot used by at least one token."""
    if not dest.numel():
        return
    lo, hi = int(dest.min()), int(dest.max())
    if lo < 0 or hi >= t_out:
        raise ValueError(f"dest values must lie in [0, t_out={t_out}), got min {lo}, max {hi}")
    used = torch.zeros(dest.shape[0], t_out, dtype=torch.bool, device=dest.device)
    used.scatter_(1, dest.long(), True)
    if not bool(used.all()):
        row, slot = (~used).nonzero()[0].tolist()
        raise ValueError(f"dest leaves slot {slot} of batch row {row} empty: every slot in "
                         f"[0, t_out={t_out}) needs at least one token")
