"""Load MCTF checkpoints: the public code's format ({"model": state_dict, ...}) or a plain state_dict."""
from __future__ import annotations

import os
from typing import Mapping

import torch


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not match the model."""


def _extract_state_dict(obj) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_ema"):
            if key in obj and isinstance(obj[key], Mapping):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointMismatchError(
        "checkpoint is neither a state_dict nor a dict with a 'model' (or 'state_dict') entry"
    )


def load_checkpoint(model: torch.nn.Module, path, map_location="cpu") -> torch.nn.Module:
    """Load weights strictly into ``model`` (patched or not) and return it.

    Keys prefixed with ``module.`` (saved from DistributedDataParallel) are accepted.
    Any missing, unexpected or wrongly shaped key raises ``CheckpointMismatchError``
    listing them all.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = torch.load(path, map_location=map_location, weights_only=True)
    state = dict(_extract_state_dict(obj))
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or wrong_shape:
        lines = [f"checkpoint {path} does not match {type(model).__name__}:"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict(state, strict=True)
    return model
