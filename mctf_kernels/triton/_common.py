"""What every launcher shares: custom-op registration, launch wrapping, block sizes."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional

import torch
import triton

from ..dispatch import interpreter_enabled as interpreting  # noqa: F401  (one reading of TRITON_INTERPRET)


def wrap(kernel):
    """The kernel, launchable inside a traced custom op (``kernel[grid](...)``)."""
    return torch.library.wrap_triton(kernel)


def custom_op(name: str, impl: Callable, backward: Optional[Callable] = None,
              setup_context: Optional[Callable] = None) -> Callable:
    """``impl`` as the ``mctf::<name>`` op (``torch.library.triton_op``, so torch.compile
    sees its kernels), with ``backward`` (torch's ``register_autograd`` convention) when
    given. Outputs after the first of a tuple-returning op are not differentiable."""
    op = torch.library.triton_op(f"mctf::{name}", impl, mutates_args=())
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return op


def block_size(n: int, cap: int, floor: int = 16) -> int:
    """Power-of-two block covering ``n`` within [floor, cap]. The interpreter runs
    one numpy op per program, so it gets the largest block (fewest programs)."""
    if interpreting():
        cap = max(cap, 1024)
    return max(floor, min(triton.next_power_of_2(max(n, 1)), cap))


def last_dim_unit(t: torch.Tensor) -> torch.Tensor:
    """Strides are passed to the kernels; copy only when the channel dim is strided
    (a strided last dim would make every load uncoalesced)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def device_guard(t: torch.Tensor) -> ContextManager:
    """Make ``t``'s CUDA device current for the launches inside: Triton launches on the
    current device, so a model on cuda:1 would otherwise run on (or fault against)
    cuda:0. A no-op for CPU tensors (interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
