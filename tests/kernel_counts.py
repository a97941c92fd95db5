"""Count the GPU kernels a forward launches, per transformer block, without a GPU.

What counts as one kernel:
- every Triton launch (``kernel[grid](...)``, intercepted at the JIT / interpreter ``run``);
- every aten op seen by a ``TorchDispatchMode`` that launches a kernel on a GPU: all ops
  except views (``OpOverload.is_view``), allocations (``empty*``), metadata queries, and
  ops whose outputs are all empty. Composite ops (``F.linear``, ``reshape``) are seen as
  the ops they decompose into, as on CUDA. The ``mctf::`` custom ops themselves are not
  counted: the mode is re-entered inside them, so their torch ops and Triton launches are.
This is a count of launches, not of time; copies that CUDA would fuse with nothing are
counted like any other op.

Usage (a report for your own runs): ``PYTHONPATH=$PWD python3 tests/kernel_counts.py``.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_NO_KERNEL = {
    "empty", "empty_strided", "_unsafe_view", "empty_like", "new_empty", "new_empty_strided", "lift_fresh",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "size", "stride",
    "_local_scalar_dense",  # a host sync, not a kernel; flagged separately
}


class _Counter:
    def __init__(self) -> None:
        self.events: List[str] = []
        self.syncs = 0
        self.in_triton = False  # the interpreter's own tensor ops are not GPU kernels


class _Mode(TorchDispatchMode):
    def __init__(self, counter: _Counter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns = func.namespace
        name = func._schema.name.split("::")[-1]
        if ns == "mctf":  # count what the custom op launches (its Python body), not the op itself
            from torch._library.custom_ops import _maybe_get_opdef

            with _Mode(self.counter):
                return _maybe_get_opdef(func)._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if self.counter.in_triton:
            return out
        if name == "_local_scalar_dense":
            self.counter.syncs += 1
        if func.is_view or name in _NO_KERNEL or (name == "copy_" and args[0] is args[1]):
            return out
        outs = out if isinstance(out, (tuple, list)) else (out,)
        tensors = [o for o in outs if isinstance(o, torch.Tensor)]
        if tensors and all(o.numel() == 0 for o in tensors):
            return out
        self.counter.events.append(f"aten.{name}")
        return out


@contextlib.contextmanager
def _triton_launches(counter: _Counter) -> Iterator[None]:
    """Record every Triton kernel launch: the interpreter's grid executor (every
    interpreted launch passes through it, whatever wraps the kernel's ``run``) or,
    on a GPU, ``JITFunction.run``."""
    from triton.runtime.jit import JITFunction

    targets = [(JITFunction, "run", lambda self: self.fn.__name__)]
    try:
        from triton.runtime.interpreter import GridExecutor
        targets.append((GridExecutor, "__call__", lambda self: self.fn.__name__))
    except ImportError:  # pragma: no cover
        pass
    patched = []
    for cls, attr, name_of in targets:
        original = getattr(cls, attr)

        def launch(self, *args, _original=original, _name_of=name_of, **kwargs):
            if kwargs.get("warmup", False) or counter.in_triton:
                return _original(self, *args, **kwargs)
            counter.events.append("triton." + _name_of(self))
            counter.in_triton = True  # the interpreter's own tensor ops are not kernels
            try:
                return _original(self, *args, **kwargs)
            finally:
                counter.in_triton = False

        setattr(cls, attr, launch)
        patched.append((cls, attr, original))
    try:
        yield
    finally:
        for cls, attr, original in patched:
            setattr(cls, attr, original)


def per_block_kernels(model: torch.nn.Module, x: torch.Tensor, autocast_dtype=None) -> List[List[str]]:
    """The kernels each block of ``model.blocks`` launches in a no-grad forward of ``x``, in
    steady state: a first, uncounted forward fills what inference caches (cast weights)."""
    counter = _Counter()
    spans: List[tuple] = []
    hooks = []
    autocast = (torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with torch.no_grad(), autocast:
        model(x)
    for blk in model.blocks:
        hooks.append(blk.register_forward_pre_hook(lambda m, a: spans.append([len(counter.events)])))
        hooks.append(blk.register_forward_hook(lambda m, a, o: spans[-1].append(len(counter.events))))
    autocast = (torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    try:
        with torch.no_grad(), autocast, _triton_launches(counter), _Mode(counter):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    per_block = [counter.events[a:b] for a, b in spans]
    per_block_syncs = counter.syncs
    if per_block_syncs:
        raise AssertionError(f"{per_block_syncs} host synchronisations (_local_scalar_dense) in the forward")
    return per_block


def tiny_patched_model(depth: int = 3, img_size: int = 64, preset_r: int = 4, dtype=torch.float32):
    """Random-init DeiT-T at a small image size, fusing in every block but the first."""
    import timm

    import mctf

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=img_size, depth=depth).eval()
    cfg = mctf.MCTFConfig.from_mctf_type([preset_r, 0, 0, 1, 1, 1, 20, 40, 1, 1, 0], activate_layer=range(1, depth))
    mctf.patch.timm(model, cfg)
    return model.to(dtype)


def report() -> Dict[str, List[int]]:
    import mctf_kernels as mk

    results = {}
    for label, dtype, amp in (("fp32", torch.float32, None), ("fp16 model", torch.float16, None),
                              ("fp32 model, fp16 autocast", torch.float32, torch.float16)):
        model = tiny_patched_model(dtype=dtype)
        x = torch.randn(2, 3, 64, 64, dtype=dtype)
        with mk.use_backend("triton"):
            blocks = per_block_kernels(model, x, amp)
        results[label] = [len(b) for b in blocks]
        print(f"{label}: kernels per block {results[label]}")
        for i, b in enumerate(blocks):
            print(f"  block {i}: " + " ".join(b))
    return results


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    report()
