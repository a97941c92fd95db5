"""Static sm_90 (H100) analysis of one MCTF forward, without a GPU: the library behind
``bench/sm90_report.py`` and ``tests/test_sm90_structure.py``.

How it sees what a GPU would run:

- The model runs on *fake* CUDA tensors (``FakeTensorMode``): no data, real shapes,
  strides and dtypes, at the real batch size. The launchers therefore take their CUDA
  branch (GPU launch configurations, ``force_gpu_configs()`` is entered as well) and
  autocast applies its CUDA casting rules. ``torch.cuda`` queries answer as an H100.
- Every Triton launch is intercepted at ``JITFunction.run`` (below any launcher, so it
  does not depend on kernel names or argument lists); the kernel is not run. The
  launch is specialised with the JIT's own binder (pointer alignment 16, integers
  ==1 / %16) for an sm_90 target and compiled with ``triton.compile``, as the JIT would.
- Every other op is seen by a ``TorchDispatchMode``; ops that launch a CUDA kernel
  (not views, metadata or allocations) are counted, one kernel each; SDPA is one kernel.
- Compiler facts come from ``cuobjdump``/``nvdisasm`` (registers, stack/local, shared
  memory, SASS) and, where local memory is used, ``ptxas -v`` (spill bytes).

Nothing here is a measurement: every time is an estimate from the constants in
``H100`` (one place), and is labelled ``est_`` in every output.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import subprocess
import tempfile
from collections import Counter, defaultdict
from typing import Any, Optional

import torch
import triton
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


def _require_compiler() -> None:
    """Kernels defined under TRITON_INTERPRET are interpreted functions, never compiled."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("bench/sm90.py compiles kernels for sm_90: run it without TRITON_INTERPRET")

# --------------------------------------------------------------------------- constants
# Every figure the estimates use, in one place. Spec values of an H100 SXM5 (80 GB)
# unless marked; the efficiencies and overheads are assumptions to calibrate on a GPU.
H100 = dict(
    name="H100 SXM5 (sm_90), static model",
    sms=132,
    clock_hz=1.755e9,                # sustained SM clock under load (assumption; boost 1.98 GHz)
    issue_per_sm_per_clk=4,          # 4 schedulers x 1 warp-instruction per clock
    hbm_bytes_per_s=3.35e12,         # HBM3 spec bandwidth
    mem_efficiency=0.80,             # achievable fraction of HBM bandwidth (assumption)
    tc_fp16_flops=989e12,            # dense fp16/bf16 tensor-core peak
    fp32_fma_flops=67e12,            # fp32 FMA peak (fp32 GEMMs: torch disables TF32 by default)
    gemm_efficiency=0.65,            # cuBLAS/SDPA fraction of peak at these shapes (assumption)
    warps_for_full_issue=16,         # resident warps per SM that hide latency (assumption)
    regs_per_sm=65536,
    reg_alloc_unit=256,              # registers, allocated per warp
    max_regs_per_thread=255,
    smem_per_sm=228 * 1024,
    smem_reserved_per_cta=1024,
    smem_alloc_unit=128,
    max_warps_per_sm=64,
    max_ctas_per_sm=32,
    eager_launch_gap_us=1.0,         # idle time between back-to-back kernels in a stream (assumption)
    eager_cpu_us_per_op=6.0,         # PyTorch eager host cost per kernel-launching op (assumption)
    graph_launch_gap_us=0.8,         # per kernel node inside a CUDA graph (assumption)
    kernel_min_us=2.5,               # shortest useful kernel: launch ramp + one DRAM round trip (assumption)
)

TARGET_ARCH = 90
MMA_OPS = ("HMMA", "HGMMA", "WGMMA", "IMMA", "QGMMA", "UTCHMMA")


# --------------------------------------------------------------------------- fake CUDA
@dataclasses.dataclass
class _Props:
    name: str = "NVIDIA H100 80GB HBM3 (static model)"
    major: int = 9
    minor: int = 0
    multi_processor_count: int = H100["sms"]
    total_memory: int = 80 * 2**30
    warp_size: int = 32
    max_threads_per_multi_processor: int = 2048
    regs_per_multiprocessor: int = H100["regs_per_sm"]
    shared_memory_per_block_optin: int = 227 * 1024
    L2_cache_size: int = 50 * 2**20


@contextlib.contextmanager
def _fake_h100():
    """``torch.cuda`` answers as one H100; device contexts are no-ops (no driver here)."""
    props = _Props()
    patches = dict(
        device_count=lambda: 1, current_device=lambda: 0,
        get_device_properties=lambda *a, **k: props, get_device_capability=lambda *a, **k: (9, 0),
        get_device_name=lambda *a, **k: props.name, device=lambda *a, **k: contextlib.nullcontext(),
        synchronize=lambda *a, **k: None, is_bf16_supported=lambda *a, **k: True,
        is_current_stream_capturing=lambda: False,
    )
    saved = {k: getattr(torch.cuda, k) for k in patches}
    for k, v in patches.items():
        setattr(torch.cuda, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(torch.cuda, k, v)


class _PtrProxy:
    """What the JIT binder sees of a (fake) tensor: its dtype and a device address.
    Allocations are 512-byte aligned (caching allocator), so the address is
    512 * k + storage_offset * itemsize, as on a GPU."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = (1 << 20) + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._ptr


# --------------------------------------------------------------------------- capture
VIEW_OR_META = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::detach", "aten::alias", "aten::lift_fresh", "aten::_unsafe_view", "aten::view", "aten::t",
    "aten::sym_size", "aten::sym_stride", "aten::sym_numel", "aten::sym_storage_offset", "aten::is_same_size",
    "aten::_reshape_alias", "aten::set_", "aten::resize_", "aten::_local_scalar_dense", "prim::device",
    "prim::layout", "aten::is_contiguous", "aten::stride", "aten::size", "aten::dim",
}
HOST_SYNC = {"aten::_local_scalar_dense", "aten::nonzero", "aten::item", "aten::equal", "aten::is_nonzero"}


def _tensor_info(t: torch.Tensor) -> dict:
    return dict(dtype=str(t.dtype).replace("torch.", ""), shape=list(t.shape), stride=list(t.stride()),
                storage_offset=int(t.storage_offset()), nbytes=int(t.numel() * t.element_size()))


def _flops(name: str, args, out) -> float:
    """Multiply-add FLOPs (2 per MAC) of the GEMM-like ops; 0 for the rest."""
    try:
        if name in ("aten::mm", "aten::addmm"):
            a, b = (args[0], args[1]) if name == "aten::mm" else (args[1], args[2])
            return 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
        if name in ("aten::bmm", "aten::baddbmm"):
            a, b = (args[0], args[1]) if name == "aten::bmm" else (args[1], args[2])
            return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        if name.startswith("aten::_scaled_dot_product") and name.endswith("_backward"):
            # grad_out, q, k, v first: recompute S, then dP, dV, dQ, dK: 5 GEMMs of the forward's size
            _g, q, k = args[0], args[1], args[2]
            return 10.0 * math.prod(q.shape[:-2]) * q.shape[-2] * k.shape[-2] * q.shape[-1]
        if name == "aten::convolution":
            w = args[1]
            return 2.0 * out.numel() * w.shape[1] * math.prod(w.shape[2:])
    except (AttributeError, IndexError):
        pass
    return 0.0


@dataclasses.dataclass
class Event:
    """One GPU kernel of the forward: a Triton launch or a kernel-launching torch op."""
    kind: str                    # "triton" | "torch"
    name: str                    # kernel qualname or aten op
    block: Optional[int]         # model.blocks index, None outside the blocks
    in_mctf_op: Optional[str]    # the mctf:: op it ran inside, if any
    bytes: int = 0               # torch ops: inputs + outputs (estimate of the traffic)
    flops: float = 0.0
    dtype: str = ""
    launch: Optional[dict] = None  # triton: specialisation, grid, options, args
    phase: str = "forward"       # "forward" | "backward" (training-step captures)
    square_bytes: int = 0        # torch ops: bytes of their (..., T, T) operands (attention-sized)


class _Recorder:
    def __init__(self):
        self.events: list[Event] = []
        self.block: Optional[int] = None
        self.op_stack: list[str] = []
        self.host_syncs: list[str] = []
        self.mute = 0
        self.phase = "forward"
        self.sdpa_spans: list = []  # (first, last] autograd sequence numbers of each SDPA call, its backward's cost

    def add(self, ev: Event):
        if not self.mute:
            self.events.append(ev)


def _intercept_jit(rec: _Recorder):
    """Patch ``JITFunction.run``: specialise for sm_90 with the JIT's own binder and
    record the launch instead of running it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit as J
    from triton import knobs

    target = GPUTarget("cuda", TARGET_ARCH, 32)
    backend = make_backend(target)
    binders: dict = {}

    def run(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        arg_info = {}
        names = [p.name for p in self.params]
        proxied = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                arg_info[names[i]] = _tensor_info(a)
                proxied.append(_PtrProxy(a))
            else:
                if not callable(a):
                    arg_info[names[i]] = dict(value=a if isinstance(a, (int, float, bool, str)) else repr(a))
                proxied.append(a)
        pkw = {}
        for k, a in kwargs.items():
            if isinstance(a, torch.Tensor):
                arg_info[k] = _tensor_info(a)
                pkw[k] = _PtrProxy(a)
            else:
                if k in names and not callable(a):
                    arg_info[k] = dict(value=a if isinstance(a, (int, float, bool, str)) else repr(a))
                pkw[k] = a
        if self not in binders:
            binders[self] = J.create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binders[self](*proxied, **pkw)
        options, signature, constexprs, attrs = self._pack_args(backend, pkw, bound, specialization, options)
        g = grid(bound) if callable(grid) else grid
        g = tuple(int(x) for x in g) + (1,) * (3 - len(g))
        rec.add(Event(
            kind="triton", name=f"{self.fn.__module__}:{self.fn.__qualname__}", block=rec.block,
            in_mctf_op=rec.op_stack[-1] if rec.op_stack else None, phase=rec.phase,
            launch=dict(fn=self, signature=signature, constexprs=constexprs, attrs=attrs,
                        options=options, grid=g, args=arg_info)))
        return None

    return mock_attr(J.JITFunction, "run", run)


@contextlib.contextmanager
def mock_attr(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class _CountOps(TorchDispatchMode):
    """Counts kernel-launching torch ops; runs the project's own ``mctf::`` ops through
    their Python implementation under this mode, so launcher-internal torch ops count."""

    def __init__(self, rec: _Recorder):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("mctf::"):
            from torch._library.custom_ops import OPDEFS
            opdef = OPDEFS.get(name)
            if opdef is not None:
                self.rec.op_stack.append(name)
                try:
                    with self:
                        return opdef._init_fn(*args, **kwargs)
                finally:
                    self.rec.op_stack.pop()
        out = func(*args, **kwargs)
        if name in HOST_SYNC and not self.rec.mute:
            self.rec.host_syncs.append(name)
        if name in VIEW_OR_META or getattr(func, "is_view", False):
            return out
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, (list, tuple)):
                tensors += [t for t in a if isinstance(t, torch.Tensor)]
        outs = [o for o in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(o, torch.Tensor)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors + outs)
        square = sum(t.numel() * t.element_size() for t in tensors + outs
                     if t.dim() >= 3 and t.shape[-1] == t.shape[-2] and t.shape[-1] >= 16)
        dtype = str((tensors or outs or [torch.empty(0)])[0].dtype).replace("torch.", "")
        self.rec.add(Event(kind="torch", name=name, block=self.rec.block,
                           in_mctf_op=self.rec.op_stack[-1] if self.rec.op_stack else None,
                           bytes=int(nbytes), flops=_flops(name, args, out), dtype=dtype, phase=self.rec.phase,
                           square_bytes=int(square)))
        return out


class _SDPAIsOneKernel(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` = one fused kernel on an H100 (flash/efficient)."""

    def __init__(self, rec: _Recorder):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = args[:3]
            Bh = math.prod(q.shape[:-2])
            flops = 4.0 * Bh * q.shape[-2] * k.shape[-2] * q.shape[-1]
            nbytes = sum(t.numel() * t.element_size() for t in (q, k, v)) + q.numel() * v.element_size()
            self.rec.add(Event(kind="torch", name="aten::scaled_dot_product_attention", block=self.rec.block,
                               in_mctf_op=self.rec.op_stack[-1] if self.rec.op_stack else None,
                               bytes=int(nbytes), flops=flops, dtype=str(q.dtype).replace("torch.", ""),
                               phase=self.rec.phase))
            self.rec.mute += 1
            try:
                grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
                lo = (q.view_as(q) if q.requires_grad else k.view_as(k) if k.requires_grad
                      else v.view_as(v)).grad_fn._sequence_nr() if grad else None
                out = func(*args, **kwargs)
                if out.dim() == 4:
                    # torch's flash/efficient CUDA kernels write (B, T, H, D) memory and return its
                    # (B, H, T, D) view, so timm's transpose(1, 2).reshape after SDPA is free on a GPU;
                    # the CPU math path returns contiguous (B, H, T, D) (a copy the report would count)
                    out = out.transpose(1, 2).contiguous().transpose(1, 2)
                if grad and out.grad_fn is not None:
                    # its backward is one fused kernel too: 5 GEMMs of the forward's size
                    self.rec.sdpa_spans.append((lo, out.grad_fn._sequence_nr(), 2.5 * flops, 2 * nbytes,
                                                str(q.dtype).replace("torch.", "")))
                return out
            finally:
                self.rec.mute -= 1
        return func(*args, **kwargs)


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "autocast": torch.float32}


@contextlib.contextmanager
def _tag_mctf_backwards(rec: _Recorder):
    """Run the ``mctf::`` ops' autograd backwards under their op's name (the engine calls
    them directly, not through the dispatcher), so their kernels count as MCTF work."""
    from torch._library.custom_ops import OPDEFS

    saved = {}
    for name, opdef in OPDEFS.items():
        fn = getattr(opdef, "_backward_fn", None)
        if not name.startswith("mctf::") or fn is None:
            continue

        def tagged(ctx, *grads, _fn=fn, _name=name):
            rec.op_stack.append(_name)
            try:
                return _fn(ctx, *grads)
            finally:
                rec.op_stack.pop()
        saved[name] = fn
        opdef._backward_fn = tagged
    # The backwards launch outside any op's dispatch, where ``wrap_triton`` would route the
    # launch through its higher-order op: launch the kernel itself (the JIT run is intercepted).
    import sys as _sys
    wrapped = [m for n, m in list(_sys.modules.items())
               if n.startswith("mctf_kernels.triton") and callable(getattr(m, "wrap", None))]
    saved_wrap = [(m, m.wrap) for m in wrapped]
    for m in wrapped:
        m.wrap = lambda kernel: kernel
    try:
        yield
    finally:
        for name, fn in saved.items():
            OPDEFS[name]._backward_fn = fn
        for m, w in saved_wrap:
            m.wrap = w


def _backward_by_hand(loss: torch.Tensor, rec: _Recorder, spans: Optional[dict], grad: Optional[torch.Tensor] = None,
                      wanted: tuple = ()) -> list:
    """``loss.backward()`` without the autograd engine, which needs a CUDA driver for CUDA
    tensors (fake ones included: it stashes their streams). Each graph node is called
    directly, in decreasing sequence number (a topological order: a node's inputs were
    recorded before it); gradients reaching one input from several uses are summed, as the
    engine does, each cast to its input's dtype first as the engine does (autocast's fp16
    ops get fp16 gradients); leaves (AccumulateGrad) take theirs without a kernel. ``spans``: block ->
    (first, last] sequence numbers of its forward, so backward kernels carry their block
    (None: leave ``rec.block`` alone, for a nested ``torch.autograd.grad``). Returns the
    gradients of the ``wanted`` leaves (None where none reached them)."""
    import heapq

    def block_of(seq: int) -> Optional[int]:
        return next((b for b, (lo, hi) in spans.items() if lo < seq <= hi), None)

    found, sdpa_seen = {}, set()
    root = loss.grad_fn
    buffers = {root: [torch.ones_like(loss) if grad is None else grad]}
    heap = [(-root._sequence_nr(), id(root), root)]
    while heap:
        _, _, node = heapq.heappop(heap)
        grads = buffers.pop(node)
        if type(node).__name__ == "AccumulateGrad":
            found[id(node.variable)] = grads[0]
            continue
        if spans is not None:
            rec.block = block_of(node._sequence_nr())
        seq = node._sequence_nr()
        sdpa = next((sp for sp in rec.sdpa_spans if sp[0] < seq <= sp[1]), None)
        if sdpa is not None and sdpa not in sdpa_seen:  # the SDPA's own backward nodes: one fused kernel
            sdpa_seen.add(sdpa)
            rec.add(Event(kind="torch", name="aten::_scaled_dot_product_attention_backward (fused)", block=rec.block,
                          in_mctf_op=rec.op_stack[-1] if rec.op_stack else None, bytes=int(sdpa[3]), flops=sdpa[2],
                          dtype=sdpa[4], phase=rec.phase))
        rec.mute += sdpa is not None
        try:
            with torch.no_grad():
                outs = node.apply(*grads) if hasattr(node, "apply") else node(*grads)
        finally:
            rec.mute -= sdpa is not None
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        for (nxt, idx), g in zip(node.next_functions, outs):
            if nxt is None or g is None:
                continue
            if nxt not in buffers:
                buffers[nxt] = [None] * len(nxt._input_metadata)
                heapq.heappush(heap, (-nxt._sequence_nr(), id(nxt), nxt))
            buf = buffers[nxt]
            with torch.no_grad():
                want = nxt._input_metadata[idx].dtype
                if g.dtype != want:  # the engine's validate_outputs casts to the input's dtype (a kernel)
                    g = g.to(want)
                buf[idx] = g if buf[idx] is None else buf[idx] + g
    if spans is not None:
        rec.block = None
    return [found.get(id(t)) for t in wanted]


@contextlib.contextmanager
def _autograd_grad_by_hand(rec: _Recorder):
    """``torch.autograd.grad(output, leaves, grad)`` inside a backward (an eager backward
    that differentiates a recomputation) without the engine, as ``_backward_by_hand``."""
    def grad(outputs, inputs, grad_outputs=None, **_kw):
        out = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        g = grad_outputs[0] if isinstance(grad_outputs, (tuple, list)) else grad_outputs
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        return tuple(_backward_by_hand(out, rec, None, g, inputs))

    with mock_attr(torch.autograd, "grad", grad):
        yield


def capture(model_name: str, batch: int, dtype: str, preset: Optional[str] = "mctf",
            model_kwargs: Optional[dict] = None, autocast_dtype: torch.dtype = torch.float16,
            train: bool = False) -> dict:
    """One forward of a random-init timm model (patched with ``preset``, or plain when
    None) on fake CUDA tensors; returns the kernel events and the token plan. ``train``:
    one training step instead (train mode, forward, the backward of the mean of the logits,
    run node by node: ``_backward_by_hand``); backward events carry ``phase="backward"`` and
    the block whose forward recorded the node that ran them."""
    import timm
    from torch._subclasses.fake_tensor import FakeTensorMode

    import mctf
    import mctf_kernels
    from mctf_kernels.triton.configs import force_gpu_configs

    _require_compiler()
    rec = _Recorder()
    with torch.device("meta"):  # weights' values never matter: shapes only
        model = timm.create_model(model_name, pretrained=False, **(model_kwargs or {})).train(train)
    if preset and preset.startswith("tome-r"):  # Token Merging, r in every block (the CLIs' tome-r<N>)
        mctf.patch.timm(model, mctf.ToMeConfig(r=int(preset[len("tome-r"):])))
    elif preset:
        mctf.patch.timm(model, mctf.MCTFConfig.preset(preset, depth=len(model.blocks)))
    with _fake_h100(), FakeTensorMode(allow_non_fake_inputs=True), force_gpu_configs():
        for mod in model.modules():  # fake CUDA storage for every meta weight
            for n, p in list(mod._parameters.items()):
                if p is not None:
                    # a leaf that requires grad, as a Parameter (autocast caches casts of those)
                    mod._parameters[n] = torch.empty(p.shape, dtype=DTYPES[dtype], device="cuda",
                                                     requires_grad=p.requires_grad)
            for n, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[n] = torch.empty(b.shape, device="cuda",
                                                  dtype=DTYPES[dtype] if b.is_floating_point() else b.dtype)
        hooks, spans = [], {}
        for i, blk in enumerate(model.blocks):
            hooks.append(blk.register_forward_pre_hook(lambda m, a, i=i: setattr(rec, "block", i)))
            hooks.append(blk.register_forward_hook(lambda m, a, o: setattr(rec, "block", None)))
            if train:  # the block's autograd nodes: sequence numbers after its input's, up to its output's
                hooks.append(blk.register_forward_hook(
                    lambda m, a, o, i=i: spans.__setitem__(i, (a[0].grad_fn._sequence_nr(), o.grad_fn._sequence_nr()))))
        size = model.patch_embed.img_size
        x = torch.randn(batch, 3, *size, device="cuda", dtype=DTYPES[dtype])
        amp = contextlib.nullcontext()
        if dtype == "autocast":  # CUDA autocast refuses to exist without a driver: only its constructor is told
            with mock_attr(torch.cuda, "is_available", lambda: True):
                amp = torch.autocast("cuda", dtype=autocast_dtype)
        def step():
            if not train:
                model(x)
                return
            with amp:
                loss = model(x).float().mean()
            rec.phase = "backward"
            _backward_by_hand(loss, rec, spans)  # outside autocast, as a training loop's backward
            rec.phase = "forward"

        grad = torch.enable_grad() if train else torch.no_grad()
        with grad, mctf_kernels.use_backend("triton"), _intercept_jit(rec), \
                (contextlib.nullcontext() if train else amp), _SDPAIsOneKernel(rec), _CountOps(rec), \
                _tag_mctf_backwards(rec), _autograd_grad_by_hand(rec):
            rec.mute += 1  # a first forward fills any cross-forward cache (e.g. cast weights): steady state is counted
            step()
            rec.mute -= 1
            rec.sdpa_spans.clear()
            step()
        for h in hooks:
            h.remove()
        tokens = list(model.mctf_state.tokens_per_block) if preset else None
    return dict(events=rec.events, host_syncs=rec.host_syncs, depth=len(model.blocks), tokens_per_block=tokens)


# --------------------------------------------------------------------------- compile
_compiled: dict = {}


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL|CONSTANT\[0\]|TEXTURE):(\d+)",
                                                       res) if k in ("REG", "STACK", "SHARED", "LOCAL")}
    instr = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    ops = Counter(i.split(".")[0] for i in instr)
    return dict(usage=usage, sass_instructions=len(instr), sass_ops=ops)


def _ptxas_spills(ptx: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([_tool("ptxas"), "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", src,
                              "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True).stderr
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(stack_frame=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3))) if m else {}


def compile_key(launch: dict) -> tuple:
    fn = launch["fn"]
    return (fn.fn.__module__, fn.fn.__qualname__, str(launch["signature"]), str(sorted(launch["constexprs"].items())),
            str(sorted(launch["attrs"].items())), str(launch["options"]))


def compile_launch(launch: dict) -> dict:
    """Compiler facts of one specialised launch for sm_90 (cached per specialisation)."""
    key = compile_key(launch)
    if key in _compiled:
        return _compiled[key]
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch["fn"]
    src = ASTSource(fn, launch["signature"], launch["constexprs"], launch["attrs"])
    k = triton.compile(src, target=GPUTarget("cuda", TARGET_ARCH, 32), options=launch["options"].__dict__)
    ru = _resource_usage(k.asm["cubin"])
    usage = ru["usage"]
    spills = {"spill_stores": 0, "spill_loads": 0, "stack_frame": usage.get("stack", 0)}
    if usage.get("stack", 0) or usage.get("local", 0):
        spills = _ptxas_spills(k.asm["ptx"]) or spills
    md = k.metadata
    shared = int(getattr(md, "shared", 0) or 0)
    ttir = k.asm.get("ttir", "")
    facts = dict(
        registers=usage.get("reg", 0), spill_bytes=spills["spill_stores"] + spills["spill_loads"],
        spill_stores=spills["spill_stores"], spill_loads=spills["spill_loads"],
        stack_frame=spills.get("stack_frame", 0), local_bytes=usage.get("local", 0),
        shared_bytes=max(shared, usage.get("shared", 0)), num_warps=md.num_warps,
        num_stages=getattr(launch["options"], "num_stages", None),
        sass_instructions_static=ru["sass_instructions"],
        mma=sorted(op for op in ru["sass_ops"] if op.startswith(MMA_OPS)),
        mma_instructions_static=sum(n for op, n in ru["sass_ops"].items() if op.startswith(MMA_OPS)),
        ffma_static=ru["sass_ops"].get("FFMA", 0),
        mufu_static=ru["sass_ops"].get("MUFU", 0),
        has_dot="tt.dot" in ttir,
        ttir=ttir,
    )
    _compiled[key] = facts
    return facts


# --------------------------------------------------------------------------- TTIR analysis
_DEF = re.compile(r"^\s*(%[\w#:]+(?:,\s*%[\w#:]+)*)\s*=\s*([\w.]+)(.*)$")
# Ops that only name, reshape or broadcast values (usually no SASS of their own): no work
_LAYOUT_OPS = frozenset({"tt.reshape", "tt.broadcast", "tt.expand_dims", "tt.splat", "tt.trans", "tt.make_range",
                         "arith.constant", "ttg.convert_layout", "tt.join", "tt.split", "arith.bitcast"})
_TENSOR = re.compile(r"tensor<((?:\d+x)+)")


def _op_work(op: str, line: str, num_threads: int) -> int:
    """Instructions per thread one TTIR op costs, roughly: its largest tensor's elements per
    thread (at least 1), 0 for layout-only ops."""
    if op in _LAYOUT_OPS:
        return 0
    numel = max((math.prod(int(d) for d in dims.rstrip("x").split("x")) for dims in _TENSOR.findall(line)),
                default=1)
    return max(1, -(-numel // num_threads))


_FOR = re.compile(r"scf\.for\s+%\w+\s*=\s*(%[\w#]+)\s+to\s+(%[\w#]+)\s+step\s+(%[\w#]+)")


def _base(v: str) -> str:
    return v.split(":")[0].split("#")[0]


_INT_OPS = {
    "arith.addi": lambda x, y: x + y, "arith.subi": lambda x, y: x - y, "arith.muli": lambda x, y: x * y,
    "arith.divsi": lambda x, y: int(x / y), "arith.ceildivsi": lambda x, y: -(-x // y), "arith.maxsi": max,
    "arith.minsi": min, "arith.remsi": lambda x, y: int(math.fmod(x, y)),
}


def analyse_ttir(ttir: str, arg_values: dict, num_warps: int = 4) -> dict:
    """From the kernel's TTIR: which pointer arguments it loads from / stores to (by
    name), and the ratio of dynamic to static op count (loops weighted by their trip
    counts, evaluated from constants and the launch's integer arguments; a trip count
    that cannot be evaluated counts once and is reported). Each op counts by the elements
    of its largest tensor per thread (a scalar: 1; layout-only ops: 0), so that straight-line
    code on small tensors (e.g. a sort of one value per token) does not dilute the loops' weight."""
    num_threads = 32 * max(1, num_warps)
    lines = [ln.split(" loc(")[0] for ln in ttir.splitlines()
             if ln.strip() and not ln.lstrip().startswith(("#", "//"))]
    func = next((ln for ln in ttir.splitlines() if "tt.func" in ln), "")
    fargs = re.findall(r"[(,]\s*(%[\w]+)\s*:", re.sub(r"loc\([^()]*(\([^()]*\))?[^()]*\)", "", func))
    values: dict = {}      # integer SSA values we can evaluate
    roots: dict = defaultdict(set)
    for name in fargs:
        roots[name] = {name}
        v = arg_values.get(name[1:])
        if isinstance(v, int) and not isinstance(v, bool):
            values[name] = v
    reads, writes = set(), set()
    depth_trips = [1]
    static_ops = dyn_ops = 0
    unknown_loops = 0

    def define(outs: str, srcs: list) -> None:
        dep = set().union(*[roots.get(v, set()) for v in srcs]) if srcs else set()
        for out in outs.split(","):
            roots[_base(out.strip())] |= dep

    for ln in lines:
        s = ln.strip()
        if s.startswith("}"):
            if s.startswith("})"):  # the end of a reduce/scan: its combine runs over the operand
                work = _op_work("tt.reduce", s, num_threads)
                static_ops += work
                dyn_ops += depth_trips[-1] * work
            if len(depth_trips) > 1:
                depth_trips.pop()
            if s.endswith("{"):  # "} else {"
                depth_trips.append(depth_trips[-1])
            continue
        m = _DEF.match(ln)
        rhs = s.split("=", 1)[1] if m else s
        srcs = [_base(v) for v in re.findall(r"%[\w#:]+", rhs)]
        if "scf.for" in s:
            fm = _FOR.search(s)
            trips = None
            if fm:
                lo, hi, st = (values.get(_base(v)) for v in fm.groups())
                if None not in (lo, hi, st) and st > 0:
                    trips = max(0, -(-(hi - lo) // st))
            if trips is None:
                unknown_loops += 1
                trips = 1
            if "iter_args" in s:  # loop-carried block arguments alias their initial values
                for a, b in re.findall(r"(%[\w#]+)\s*=\s*(%[\w#:]+)", s.split("iter_args", 1)[1]):
                    roots[a] |= roots.get(_base(b), set())
            if m:
                define(m.group(1), srcs)
            depth_trips.append(depth_trips[-1] * trips)
            continue
        if "scf.while" in s:
            unknown_loops += 1
        if m:
            outs, op, rest = m.group(1), m.group(2), m.group(3)
            define(outs, srcs)
            if op == "arith.constant":
                cm = re.match(r"\s*(-?\d+)\s*:\s*i\d+", rest)
                if cm:
                    values[_base(outs)] = int(cm.group(1))
            elif op in _INT_OPS and len(srcs) >= 2:
                a, b = values.get(srcs[0]), values.get(srcs[1])
                if a is not None and b is not None and (b != 0 or op in ("arith.addi", "arith.subi", "arith.muli",
                                                                         "arith.maxsi", "arith.minsi")):
                    values[_base(outs)] = _INT_OPS[op](a, b)
            elif op == "tt.load" and srcs:
                reads |= roots.get(srcs[0], set())
            elif op.startswith("tt.atomic") and srcs:
                writes |= roots.get(srcs[0], set())
        elif s.startswith("tt.store") and srcs:
            writes |= roots.get(srcs[0], set())
        if not s.startswith(("tt.func", "module", "scf.yield", "tt.return")):
            work = _op_work(m.group(2) if m else s.split(" ", 1)[0], s, num_threads)
            static_ops += work
            dyn_ops += depth_trips[-1] * work
        if s.endswith("{") and not s.startswith(("tt.func", "module")):
            depth_trips.append(depth_trips[-1])
    return dict(read_args=sorted(r[1:] for r in reads if r in fargs),
                write_args=sorted(w[1:] for w in writes if w in fargs),
                dyn_over_static=(dyn_ops / static_ops) if static_ops else 1.0, unknown_trip_loops=unknown_loops)


# --------------------------------------------------------------------------- estimates
def occupancy(registers: int, warps: int, shared_bytes: int, hw: dict = H100) -> dict:
    """Resident CTAs per SM and the occupancy (resident warps / 64) on an H100."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / hw["reg_alloc_unit"]) * hw["reg_alloc_unit"]
    # the register file is split over the 4 schedulers: a warp's registers live in one quarter
    by_regs = 4 * ((hw["regs_per_sm"] // 4) // regs_per_warp) // warps
    smem = math.ceil((shared_bytes + hw["smem_reserved_per_cta"]) / hw["smem_alloc_unit"]) * hw["smem_alloc_unit"]
    by_smem = hw["smem_per_sm"] // smem
    by_warps = hw["max_warps_per_sm"] // warps
    ctas = max(0, min(hw["max_ctas_per_sm"], by_regs, by_smem, by_warps))
    limiter = min((("registers", by_regs), ("shared memory", by_smem), ("warps", by_warps),
                   ("CTA slots", hw["max_ctas_per_sm"])), key=lambda kv: kv[1])[0]
    return dict(ctas_per_sm=ctas, occupancy=ctas * warps / hw["max_warps_per_sm"], limited_by=limiter)


def estimate_triton(grid: tuple, facts: dict, ttir_info: dict, nbytes: int, hw: dict = H100) -> dict:
    """Roofline/issue estimate of one launch (microseconds); all figures are estimates."""
    programs = math.prod(grid)
    warps = facts["num_warps"]
    occ = occupancy(facts["registers"], warps, facts["shared_bytes"], hw)
    per_sm = math.ceil(programs / hw["sms"])
    dyn = facts["sass_instructions_static"] * ttir_info["dyn_over_static"]
    resident_warps = min(max(occ["ctas_per_sm"], 1), per_sm) * warps
    eff = min(1.0, resident_warps / hw["warps_for_full_issue"])
    issue_us = per_sm * warps * dyn / (hw["issue_per_sm_per_clk"] * hw["clock_hz"] * eff) * 1e6
    mem_us = nbytes / (hw["hbm_bytes_per_s"] * hw["mem_efficiency"]) * 1e6
    return dict(programs=programs, waves=programs / max(1, occ["ctas_per_sm"] * hw["sms"]), **occ,
                est_sass_per_program=dyn, est_issue_us=issue_us, est_memory_us=mem_us,
                est_us=max(issue_us, mem_us, hw["kernel_min_us"]),
                est_bound="issue" if issue_us >= mem_us else "memory")


def estimate_torch(ev: Event, hw: dict = H100) -> dict:
    mem_us = ev.bytes / (hw["hbm_bytes_per_s"] * hw["mem_efficiency"]) * 1e6
    peak = hw["fp32_fma_flops"] if ev.dtype == "float32" else hw["tc_fp16_flops"]
    flop_us = ev.flops / (peak * hw["gemm_efficiency"]) * 1e6 if ev.flops else 0.0
    return dict(est_memory_us=mem_us, est_flop_us=flop_us, est_us=max(mem_us, flop_us, hw["kernel_min_us"]))


def _timeline(events: list, hw: dict = H100) -> dict:
    """Forward time estimates: eager (stream time vs host launch time) and CUDA graph."""
    n = len(events)
    gpu = sum(e["est_us"] for e in events)
    eager = max(gpu + n * hw["eager_launch_gap_us"], n * hw["eager_cpu_us_per_op"])
    graph = gpu + n * hw["graph_launch_gap_us"]
    return dict(kernels=n, est_gpu_us=gpu, est_eager_us=eager, est_cuda_graph_us=graph)


# --------------------------------------------------------------------------- report
def _cx_names(launch: dict) -> dict:
    names = launch["fn"].arg_names
    return {names[p[0]]: (v if isinstance(v, (int, float, bool, str)) else repr(v))
            for p, v in launch["constexprs"].items()}


def _short(name: str) -> str:
    return name.split(":")[-1]


def analyse(cap: dict, hw: dict = H100) -> dict:
    """Per-event estimates (compiling every distinct Triton launch) for one capture."""
    out = []
    for ev in cap["events"]:
        d = dict(kind=ev.kind, name=ev.name, block=ev.block, in_mctf_op=ev.in_mctf_op, phase=ev.phase,
                 square_bytes=ev.square_bytes)
        if ev.kind == "triton":
            L = ev.launch
            facts = compile_launch(L)
            vals = {k: v.get("value") for k, v in L["args"].items()}
            info = analyse_ttir(facts["ttir"], vals, L["options"].num_warps)
            ptrs = {k for k, t in L["signature"].items() if str(t).startswith("*")}
            touched = [a for a in set(info["read_args"]) | set(info["write_args"]) if a in ptrs and a in L["args"]]
            nbytes = sum(L["args"][a]["nbytes"] for a in touched)
            d.update(grid=list(L["grid"]), num_warps=L["options"].num_warps, num_stages=L["options"].num_stages,
                     constexprs=_cx_names(L), args=L["args"],
                     specialisation={k: v for k, v in L["signature"].items()},
                     reads=[a for a in info["read_args"] if a in ptrs],
                     writes=[a for a in info["write_args"] if a in ptrs],
                     est_bytes=nbytes, est_dyn_over_static=info["dyn_over_static"],
                     unknown_trip_loops=info["unknown_trip_loops"],
                     compile_key=list(_compiled).index(compile_key(L)),
                     **{k: v for k, v in facts.items() if k not in ("ttir", "num_warps", "num_stages")})
            d.update(estimate_triton(tuple(L["grid"]), facts, info, nbytes, hw))
        else:
            d.update(dtype=ev.dtype, est_bytes=ev.bytes, flops=ev.flops, **estimate_torch(ev, hw))
        d["role"] = ("mctf" if ev.kind == "triton" or ev.in_mctf_op else "dense" if ev.flops else "other")
        out.append(d)
    return dict(events=out, tokens_per_block=cap["tokens_per_block"], host_syncs=cap["host_syncs"], depth=cap["depth"])


def _per_block(events: list, depth: int) -> list:
    rows = []
    for b in list(range(depth)) + [None]:
        evs = [e for e in events if e["block"] == b]
        row = dict(block=b if b is not None else "outside blocks", kernels=len(evs),
                   triton=sum(e["kind"] == "triton" for e in evs), torch=sum(e["kind"] == "torch" for e in evs),
                   fused=any(e["role"] == "mctf" for e in evs))
        for role in ("dense", "mctf", "other"):
            row[f"est_{role}_us"] = sum(e["est_us"] for e in evs if e["role"] == role)
        row["torch_ops"] = dict(Counter(e["name"] for e in evs if e["kind"] == "torch"))
        rows.append(row)
    return rows


def _kernels_table(events: list) -> list:
    """One row per Triton kernel: its launch in the first fused layer (the largest T) and totals."""
    rows = {}
    for e in events:
        if e["kind"] != "triton":
            continue
        name = _short(e["name"])
        if name in rows and e["block"] is not None and (rows[name]["first"]["block"] is None
                                                        or e["block"] < rows[name]["first"]["block"]):
            rows[name]["first"] = e  # a backward launches deepest block first: keep the first fused layer's
        if name not in rows:
            rows[name] = dict(kernel=name, module=e["name"].split(":")[0], launches=0, est_total_us=0.0,
                              specialisations=set(), max_registers=0, max_spill_bytes=0, min_occupancy=1.0,
                              first=e)
        r = rows[name]
        r["launches"] += 1
        r["est_total_us"] += e["est_us"]
        r["specialisations"].add(e["compile_key"])
        r["max_registers"] = max(r["max_registers"], e["registers"])
        r["max_spill_bytes"] = max(r["max_spill_bytes"], e["spill_bytes"])
        r["min_occupancy"] = min(r["min_occupancy"], e["occupancy"])
    out = []
    for r in rows.values():
        f = r.pop("first")
        r["specialisations"] = len(r["specialisations"])
        r["first_fused_layer"] = {k: f[k] for k in (
            "block", "grid", "programs", "waves", "num_warps", "num_stages", "registers", "spill_bytes",
            "shared_bytes", "ctas_per_sm", "occupancy", "limited_by", "sass_instructions_static",
            "est_sass_per_program", "mma", "mma_instructions_static", "ffma_static", "est_bytes",
            "est_issue_us", "est_memory_us", "est_us", "est_bound", "constexprs", "unknown_trip_loops")}
        r["mma"] = f["mma"]
        out.append(r)
    return out


def _training_summary(pat: list, pla: list, depth: int) -> dict:
    """A training step's figures (``train=True``): kernels and estimated time per phase,
    MCTF's share of the backward, and the attention-sized (..., T, T) bytes its torch ops
    move (what an eager backward that forms P costs). Every time is an estimate."""
    def phase(evs, ph):
        return [e for e in evs if e.get("phase", "forward") == ph]

    bwd, bwd_plain = phase(pat, "backward"), phase(pla, "backward")
    mctf_bwd = [e for e in bwd if e["role"] == "mctf"]
    blocks = _per_block(bwd, depth)
    fused = [r for r in blocks if r["fused"]]
    step, step_plain = _timeline(pat), _timeline(pla)
    out = dict(
        kernels_per_step=len(pat), kernels_per_step_plain=len(pla),
        backward_kernels=len(bwd), backward_kernels_plain=len(bwd_plain),
        backward_triton_launches=sum(e["kind"] == "triton" for e in bwd),
        backward_mctf_kernels=len(mctf_bwd),
        backward_mctf_kernels_per_fused_layer_max=max(
            (sum(e["block"] == r["block"] for e in mctf_bwd) for r in fused), default=0),
        backward_kernels_per_fused_layer_max=max((r["kernels"] for r in fused), default=0),
        backward_kernels_per_plain_block=max((r["kernels"] for r in _per_block(bwd_plain, depth)
                                              if r["block"] != "outside blocks"), default=0),
        est_backward_us=sum(e["est_us"] for e in bwd), est_backward_plain_us=sum(e["est_us"] for e in bwd_plain),
        est_backward_mctf_us=sum(e["est_us"] for e in mctf_bwd),
        est_backward_dense_us=sum(e["est_us"] for e in bwd if e["role"] == "dense"),
        est_forward_us=sum(e["est_us"] for e in phase(pat, "forward")),
        backward_mctf_square_bytes=sum(e.get("square_bytes", 0) for e in mctf_bwd),
        backward_mctf_torch_ops=dict(Counter(e["name"] for e in mctf_bwd if e["kind"] == "torch")),
        backward_mctf_triton=dict(Counter(_short(e["name"]) for e in mctf_bwd if e["kind"] == "triton")),
        est_step_eager_us=step["est_eager_us"], est_step_plain_eager_us=step_plain["est_eager_us"],
        est_step_cuda_graph_us=step["est_cuda_graph_us"], est_step_plain_cuda_graph_us=step_plain["est_cuda_graph_us"],
    )
    out["est_backward_mctf_share_of_step"] = out["est_backward_mctf_us"] / max(step["est_gpu_us"], 1e-9)
    out["est_backward_mctf_share_of_backward"] = out["est_backward_mctf_us"] / max(out["est_backward_us"], 1e-9)
    out["est_step_speedup_eager"] = (step_plain["est_eager_us"] / step["est_eager_us"]) if pla else None
    out["est_step_speedup_cuda_graph"] = (step_plain["est_cuda_graph_us"] / step["est_cuda_graph_us"]) if pla else None
    return out


def report(model: str, batch: int, dtype: str, preset: str = "mctf", model_kwargs: Optional[dict] = None,
           latency_batch: Optional[int] = 1, hw: dict = H100, plain: bool = True, train: bool = False) -> dict:
    """Everything the static report states, as one JSON-able dict (``plain=False`` skips the
    plain-model run: its comparisons are then None). ``train``: every run is one training
    step (forward + backward, ``capture(train=True)``) and ``summary["training"]`` holds
    the step's figures; the forward figures then count the step's kernels."""
    import datetime
    import platform

    import timm

    runs = {}
    for label, b, pre in (("patched", batch, preset),) + ((("plain", batch, None),) if plain else ()) + (
            (("patched_latency", latency_batch, preset), ("plain_latency", latency_batch, None))
            if latency_batch else ()):
        runs[label] = analyse(capture(model, b, dtype, pre, model_kwargs, train=train), hw)
    empty = dict(events=[], tokens_per_block=None, host_syncs=[], depth=0)
    pat, pla = runs["patched"], runs.get("plain", empty)
    blocks = _per_block(pat["events"], pat["depth"])
    fused = [r for r in blocks if r["fused"]]
    plain_blocks = _per_block(pla["events"], pla["depth"])
    tl_p, tl_b = _timeline(pat["events"], hw), _timeline(pla["events"], hw)
    dense_fused = sum(r["est_dense_us"] for r in fused)
    mctf_fused = sum(r["est_mctf_us"] for r in fused)
    summary = dict(
        kernels_per_forward=tl_p["kernels"], kernels_per_forward_plain=tl_b["kernels"],
        triton_launches_per_forward=sum(e["kind"] == "triton" for e in pat["events"]),
        fused_layers=len(fused),
        kernels_per_fused_layer_max=max((r["kernels"] for r in fused), default=0),
        kernels_per_fused_layer_min=min((r["kernels"] for r in fused), default=0),
        kernels_per_plain_block=max((r["kernels"] for r in plain_blocks if r["block"] != "outside blocks"),
                                    default=0),
        triton_kernels_per_fused_layer_max=max((r["triton"] for r in fused), default=0),
        torch_kernels_per_fused_layer_max=max((r["torch"] for r in fused), default=0),
        max_spill_bytes=max((e["spill_bytes"] for e in pat["events"] if e["kind"] == "triton"), default=0),
        kernels_with_spills=sorted({_short(e["name"]) for e in pat["events"]
                                    if e["kind"] == "triton" and e["spill_bytes"]}),
        kernels_without_mma=sorted({_short(e["name"]) for e in pat["events"]
                                    if e["kind"] == "triton" and not e["mma"]}),
        dot_kernels_without_mma=sorted({_short(e["name"]) for e in pat["events"]
                                        if e["kind"] == "triton" and e["has_dot"] and not e["mma"]}),
        host_syncs=len(pat["host_syncs"]),
        est_mctf_us_fused_layers=mctf_fused, est_dense_us_fused_layers=dense_fused,
        est_mctf_share_of_fused_layer_dense=mctf_fused / dense_fused if dense_fused else None,
        est_patched_eager_us=tl_p["est_eager_us"], est_plain_eager_us=tl_b["est_eager_us"],
        est_speedup_eager=tl_b["est_eager_us"] / tl_p["est_eager_us"] if plain else None,
        est_patched_cuda_graph_us=tl_p["est_cuda_graph_us"], est_plain_cuda_graph_us=tl_b["est_cuda_graph_us"],
        est_speedup_cuda_graph=tl_b["est_cuda_graph_us"] / tl_p["est_cuda_graph_us"] if plain else None,
        dense_flops_patched=sum(e.get("flops", 0) for e in pat["events"]),
        dense_flops_plain=sum(e.get("flops", 0) for e in pla["events"]),
    )
    # kernels above 5% of their fused layer's estimated time that run below 25% occupancy
    hot = set()
    for r in fused:
        layer_us = r["est_dense_us"] + r["est_mctf_us"] + r["est_other_us"]
        for e in pat["events"]:
            if e["block"] == r["block"] and e["kind"] == "triton" and e["est_us"] > 0.05 * layer_us \
                    and e["occupancy"] < 0.25:
                hot.add(_short(e["name"]))
    summary["est_hot_kernels_below_25pct_occupancy"] = sorted(hot)
    summary["flop_ideal_speedup"] = (summary["dense_flops_plain"] / max(summary["dense_flops_patched"], 1)
                                     if plain else None)
    if train:
        summary["training"] = _training_summary(pat["events"], pla["events"], pat["depth"])
    if latency_batch:
        lp, lb = _timeline(runs["patched_latency"]["events"], hw), _timeline(runs["plain_latency"]["events"], hw)
        summary.update({f"est_patched_b{latency_batch}_cuda_graph_us": lp["est_cuda_graph_us"],
                        f"est_plain_b{latency_batch}_cuda_graph_us": lb["est_cuda_graph_us"],
                        f"est_speedup_b{latency_batch}_cuda_graph": lb["est_cuda_graph_us"] / lp["est_cuda_graph_us"]})
    return dict(
        device="static sm_90 report, no GPU",
        method=("fake CUDA tensors through the real launchers (GPU launch configurations), every Triton launch "
                "specialised by the JIT's binder for sm_90 and compiled with triton.compile; ptxas/cuobjdump facts; "
                "times are estimates from the constants below, never measurements"),
        model=model, batch=batch, dtype=dtype, preset=preset, model_kwargs=model_kwargs or {}, train=train,
        latency_batch=latency_batch, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions=dict(torch=torch.__version__, triton=triton.__version__, timm=timm.__version__,
                      python=platform.python_version()),
        constants=dict(hw), tokens_per_block=pat["tokens_per_block"], summary=summary,
        kernels=_kernels_table(pat["events"]), blocks=blocks, plain_blocks=plain_blocks,
        launches=[e for e in pat["events"] if e["kind"] == "triton"],
        torch_ops_patched=dict(Counter(e["name"] for e in pat["events"] if e["kind"] == "torch")),
        torch_ops_plain=dict(Counter(e["name"] for e in pla["events"] if e["kind"] == "torch")),
    )


def structure(model: str, batch: int, dtype: str, preset: str = "mctf", model_kwargs: Optional[dict] = None) -> dict:
    """The report's counts and compiler facts only (no latency run): what CI asserts."""
    r = report(model, batch, dtype, preset, model_kwargs, latency_batch=None, plain=False)
    keep = ("block", "name", "grid", "num_warps", "registers", "spill_bytes", "shared_bytes", "occupancy", "mma",
            "has_dot", "in_mctf_op", "sass_instructions_static")
    return dict(summary=r["summary"], kernels=r["kernels"], blocks=r["blocks"], plain_blocks=r["plain_blocks"],
                launches=[{k: e[k] for k in keep} for e in r["launches"]])


if __name__ == "__main__":  # python3 bench/sm90.py OUT.json '[["deit_small_patch16_224", 8, "fp16", null], ...]'
    import json
    import sys

    if not all(os.path.exists(_tool(t)) for t in ("ptxas", "cuobjdump")):
        sys.exit(3)  # no CUDA compiler toolchain in this Triton install
    specs = json.loads(sys.argv[2])
    # an optional fifth entry names the preset (e.g. "tome-r16"; default "mctf")
    result = {"|".join(map(str, s)): structure(s[0], s[1], s[2], *s[4:5], model_kwargs=s[3]) for s in specs}
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, default=str)
