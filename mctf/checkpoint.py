"""Load MCTF checkpoints: the public training script's format or a plain state_dict.

The training script saves ``{'model': state_dict, 'optimizer': ..., 'lr_scheduler': ...,
'model_ema': ..., 'epoch': int, 'scaler': ..., 'args': argparse.Namespace}``. We load it
with ``torch.load(weights_only=True)`` and allow exactly one class beyond tensors and plain
containers, ``argparse.Namespace`` (a bag of attributes, no code runs to rebuild it), so a
checkpoint can never make us unpickle anything else.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from typing import Mapping

import torch

# the classes a checkpoint may hold besides tensors and plain data
SAFE_GLOBALS = (argparse.Namespace,)


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not match the model."""


class CheckpointLoadError(RuntimeError):
    """The file cannot be read as a checkpoint (empty, truncated, corrupt, or holding
    objects other than tensors, plain data and ``argparse.Namespace``)."""


def _load(path, map_location):
    if os.path.getsize(path) == 0:
        raise CheckpointLoadError(f"checkpoint {path} is empty (0 bytes)")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if refused:
            raise CheckpointLoadError(
                f"checkpoint {path} holds {refused.group(1)}, which is not a tensor, plain data or "
                f"argparse.Namespace; refusing to unpickle it (it could run code)"
            ) from None
        detail = re.search(r"(Unsupported operand[^\n]*)", str(exc))
        raise CheckpointLoadError(
            f"checkpoint {path} is corrupt or not a torch checkpoint"
            + (f" ({detail.group(1)})" if detail else "")
        ) from None
    except (EOFError, RuntimeError, ValueError, zipfile.BadZipFile, OSError, IndexError, KeyError) as exc:
        raise CheckpointLoadError(
            f"checkpoint {path} cannot be read (truncated or corrupt?): {exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


def _extract_state_dict(obj, path) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_ema"):
            if key in obj and isinstance(obj[key], Mapping):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointMismatchError(
        f"checkpoint {path} is neither a state_dict nor a dict with a 'model' (or 'state_dict') entry"
    )


def load_checkpoint(model: torch.nn.Module, path, map_location="cpu") -> torch.nn.Module:
    """Load weights strictly into ``model`` (patched or not) and return it.

    Accepts the public training script's dict (``'model'`` is loaded; ``'args'`` may be an
    ``argparse.Namespace``) or a plain state_dict. Keys prefixed with ``module.`` (saved
    from DistributedDataParallel) are accepted. Any missing, unexpected or wrongly shaped
    key raises ``CheckpointMismatchError`` listing them all; an unreadable file (empty,
    truncated, corrupt, or holding other classes, which are never unpickled) raises
    ``CheckpointLoadError`` naming it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = _load(path, map_location)
    state = dict(_extract_state_dict(obj, path))
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
