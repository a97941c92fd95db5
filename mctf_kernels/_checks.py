"""Argument checks shared by the ops: fail early, naming the argument."""
from __future__ import annotations

import torch

POOLING_MODES = (0, 1, 2, 3)


def check_tokens(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (B, T, C), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")


def check_per_token(name: str, v, batch: int, tokens: int, device: torch.device) -> None:
    if v is None:
        return
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(v).__name__}")
    if tuple(v.shape) != (batch, tokens):
        raise ValueError(f"{name} must have shape (B, T) = ({batch}, {tokens}), got {tuple(v.shape)}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device} but the tokens are on {device}")


def check_temperature(name: str, tau: float) -> None:
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or tau < 0:
        raise ValueError(f"{name} must be a number >= 0 (0 disables the criterion), got {tau!r}")


def check_pooling(mode) -> None:
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling mode must be one of {POOLING_MODES}, got {mode!r}")


def check_dest(dest: torch.Tensor, batch: int, tokens: int, t_out: int, device) -> None:
    """Shape, dtype and device of a slot map. Its values must lie in [0, t_out) and
    cover every slot (``match`` guarantees it); checking them would need a host sync."""
    if not isinstance(dest, torch.Tensor) or dest.dtype not in (torch.int32, torch.int64):
        raise TypeError("dest must be an int32/int64 tensor (the slot map from match)")
    if tuple(dest.shape) != (batch, tokens):
        raise ValueError(f"dest must have shape (B, T) = ({batch}, {tokens}), got {tuple(dest.shape)}")
    if dest.device != device:
        raise ValueError(f"dest is on {dest.device} but the tokens are on {device}")
    if not isinstance(t_out, int) or not 1 <= t_out <= tokens:
        raise ValueError(f"t_out must be an int in [1, T={tokens}], got {t_out!r}")
