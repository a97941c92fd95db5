"""Backend selection: ``reference`` (eager PyTorch), ``triton`` (fused kernels) or ``auto``.

- ``reference`` always runs the eager ops.
- ``triton`` runs the kernels and raises ``BackendUnavailable`` when it cannot
  (CPU tensor without ``TRITON_INTERPRET=1``, Triton not importable, an op or
  option without a kernel). It never falls back silently.
- ``auto`` (default) uses Triton where it can serve the input and otherwise the
  reference, warning once per reason.

Choose with the environment variable ``MCTF_BACKEND`` or ``set_backend(name)``;
``use_backend(name)`` is a context manager for a temporary choice.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("auto", "reference", "triton")
_override: Optional[str] = None
_warned: set = set()


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this op on this input."""


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The backend in force: ``set_backend``'s choice, else ``$MCTF_BACKEND``, else ``auto``."""
    if _override is not None:
        return _override
    return _validate(os.environ.get("MCTF_BACKEND", "auto").strip().lower() or "auto", "MCTF_BACKEND")


def set_backend(name: Optional[str]) -> None:
    """Select the backend for all ops; ``None`` returns to ``$MCTF_BACKEND``."""
    global _override
    _override = None if name is None else _validate(name, "backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _import_triton() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton cannot be imported ({exc.__class__.__name__}: {exc})"
    return None


# Read once at import: a plain value keeps dispatch traceable by torch.compile (a cached
# function, e.g. functools.lru_cache, makes every compile of a patched model warn).
_TRITON_IMPORT_ERROR: Optional[str] = _import_triton()


def _triton_launcher(op: str) -> Optional[Callable]:
    from . import triton as triton_ops

    return triton_ops.LAUNCHERS.get(op)


def triton_unavailable_reason(op: str, device: torch.device, backend: str) -> Optional[str]:
    """Why Triton cannot serve ``op`` on ``device``; None when it can."""
    if _TRITON_IMPORT_ERROR:
        return _TRITON_IMPORT_ERROR
    if device.type == "cpu":
        if not interpreter_enabled():
            return "Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)"
        if backend != "triton":
            return "CPU tensors use the reference unless the backend is 'triton' under TRITON_INTERPRET=1"
    elif device.type != "cuda":
        return f"Triton kernels do not run on {device.type} tensors"
    if _triton_launcher(op) is None:
        return f"no Triton kernel for op '{op}'"
    return None


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"mctf_kernels backend 'auto' uses the reference: {reason}", stacklevel=3)


def select(op: str, device: torch.device, extra_reason: Optional[str] = None) -> Optional[Callable]:
    """Return the Triton launcher for ``op``, or None to run the reference.

    ``extra_reason`` is an op-specific reason the kernel cannot serve this call
    (e.g. an unsupported option); it is treated like any other unavailability.
    """
    backend = get_backend()
    if backend == "reference":
        return None
    reason = triton_unavailable_reason(op, device, backend) or extra_reason
    if reason is None:
        return _triton_launcher(op)
    if backend == "triton":
        raise BackendUnavailable(f"backend 'triton' cannot run {op}: {reason}")
    if device.type == "cuda":  # elsewhere the reference is auto's documented choice, not a fallback
        _warn_once(f"{op}: {reason}")
    return None
