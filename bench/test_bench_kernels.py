"""Per-op kernel benchmarks: eager reference vs torch.compile(reference) vs Triton.

Each result's ``extra_info`` holds the median ms, the minimum bytes the op must
move (formula in ``BYTES_FORMULA``), GB/s and the percentage of the device's
copy bandwidth measured in the same session (``copy_bandwidth`` fixture).
Shapes are the first fusion layer of each model (r = 16, as the ``mctf`` preset).

    pytest bench/ --benchmark-json bench/results/kernels-<gpu>-<date>.json
    pytest bench/ --cpu-smoke          # tiny CPU run, proves the suite works
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

import mctf_kernels as mk
from benchutil import smoke_enabled, sync

SHAPES = {  # first fusion layer: all tokens of the model
    "deit_s": dict(B=256, T=197, C=384, H=6),         # DeiT-S/16 @ 224
    "vit_l16_384": dict(B=64, T=577, C=1024, H=16),   # ViT-L/16 @ 384
    "vit_h14_518": dict(B=16, T=1370, C=1280, H=16),  # ViT-H/14 @ 518
}
SMOKE_SHAPES = {"smoke_t17": dict(B=2, T=17, C=32, H=2)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SMOKE_DTYPES = ("fp16",)  # one dtype keeps the CPU smoke run (inductor compiles) short
PROVIDERS = ("reference", "compiled", "triton")
R = 16  # the "mctf" preset's r; tokens_to_remove clamps it for tiny T
# inductor by default; the CI smoke test may pick "aot_eager" (same tracing, no C++/Triton codegen)
COMPILE_BACKEND = os.environ.get("MCTF_BENCH_COMPILE_BACKEND", "inductor")

# Minimum bytes read + written by an ideal single pass (e = element size of the
# dtype, B*T per-token vectors float32, dest int64 as ``match`` returns it).
# Intermediates (the score matrix, P') are not counted: a fused kernel needn't
# write them. T' = T - r, D = C / H.
BYTES_FORMULA = {
    "match": "B*T*C*e (x) + B*T*4 (attn_received) + B*T*4 (size) + B*T*8 (dest)",
    "merge": "B*T*C*e (x) + B*T*(8+4+4) (dest, size, attn_received) + B*T'*C*e (x') + B*T'*4 (size')",
    "attention_received": "B*H*T*T*e (attn) + B*T*4 (attn_received)",
    "fused_attention_output": "B*H*T*T*e (attn) + B*H*T'*D*e (v') + B*T*(8+4+4) (dest, size, attn_received) "
                              "+ B*H*T'*D*e (output)",
    # flash-style path: P is recomputed from q, k and never stored. fusion_attention writes
    # lse and received in one launch; fused_attention_output_qk does not read lse (torch's
    # attention recomputes the softmax) and its V'[dest] (B*H*T*D*e, written and read once
    # more) is an intermediate, not counted
    "fusion_attention": "2*B*H*T*D*e (q, k) + B*T*4 (log_size) + B*H*T*4 (lse) + B*T*4 (received)",
    "fused_attention_output_qk": "2*B*H*T*D*e (q, k) + B*T*4 (log_size) + B*H*T'*D*e (v') "
                                 "+ B*T*(8+4+4) (dest, size, attn_received) + B*H*T'*D*e (output)",
}


def bytes_moved(op: str, B: int, T: int, C: int, H: int, t_out: int, e: int) -> int:
    D = C // H
    if op == "match":
        return B * T * C * e + B * T * (4 + 4 + 8)
    if op == "merge":
        return B * T * C * e + B * T * (8 + 4 + 4) + B * t_out * C * e + B * t_out * 4
    if op == "attention_received":
        return B * H * T * T * e + B * T * 4
    if op == "fused_attention_output":
        return B * H * T * T * e + 2 * B * H * t_out * D * e + B * T * (8 + 4 + 4)
    if op == "fusion_attention":
        return 2 * B * H * T * D * e + B * T * 4 + B * H * T * 4 + B * T * 4
    if op == "fused_attention_output_qk":
        return 2 * B * H * T * D * e + B * T * 4 + 2 * B * H * t_out * D * e + B * T * (8 + 4 + 4)
    raise ValueError(op)


def flops(op: str, B: int, T: int, C: int, H: int, t_out: int) -> int:
    """Dominant matmul FLOPs (2 per multiply-add), 0 for the pure-bandwidth ops."""
    if op == "match":  # similarity of the two halves: (T/2) x (T/2) dot products of length C
        return 2 * B * ((T + 1) // 2) * (T // 2) * C
    if op == "fused_attention_output":  # P @ V'[dest]
        return 2 * B * H * T * T * (C // H)
    if op == "fusion_attention":  # q k^T once for T <= 256 (the key row is one on-chip tile), else
        # twice (a log-sum-exp loop, then a column-sum loop): configs.ATTENTION_ONE_TILE_MAX_T
        from mctf_kernels.triton.configs import ATTENTION_ONE_TILE_MAX_T
        return (1 if T <= ATTENTION_ONE_TILE_MAX_T else 2) * 2 * B * H * T * T * (C // H)
    if op == "fused_attention_output_qk":  # q k^T, then P @ V'[dest] (torch's fused attention)
        return 2 * 2 * B * H * T * T * (C // H)
    return 0


def pytest_generate_tests(metafunc):
    smoke = smoke_enabled(metafunc.config)
    shapes = SMOKE_SHAPES if smoke else SHAPES
    dtypes = SMOKE_DTYPES if smoke else tuple(DTYPES)
    if "shape_name" in metafunc.fixturenames:
        metafunc.parametrize("shape_name", list(shapes))
    if "dtype_name" in metafunc.fixturenames:
        metafunc.parametrize("dtype_name", list(dtypes))
    if "provider" in metafunc.fixturenames:
        metafunc.parametrize("provider", PROVIDERS)


@functools.lru_cache(maxsize=1)  # one shape at a time: ViT-H's attention is ~1 GB
def make_inputs(shape_name: str, dtype_name: str, device_str: str) -> dict:
    shape = {**SHAPES, **SMOKE_SHAPES}[shape_name]
    B, T, C, H = shape["B"], shape["T"], shape["C"], shape["H"]
    device, dtype = torch.device(device_str), DTYPES[dtype_name]
    g = torch.Generator(device=device).manual_seed(0)
    r = mk.tokens_to_remove(T, R, 1)
    t_out = T - r
    x = torch.randn(B, T, C, device=device, generator=g).to(dtype)
    # a real softmax (rows sum to 1), as the model produces
    attn = (2 * torch.randn(B, H, T, T, device=device, generator=g)).softmax(-1).to(dtype)
    size = torch.randint(1, 5, (B, T), device=device, generator=g).float()  # an earlier layer's sizes
    attn_received = mk.attention_received_reference(attn)
    with torch.no_grad():
        dest = mk.match_reference(x, r, attn_received, size)
    v = torch.randn(B, H, t_out, C // H, device=device, generator=g).to(dtype)
    # queries and keys as the model passes them: strided views of one qkv projection
    qkv = torch.randn(B, T, 3, H, C // H, device=device, generator=g).to(dtype).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    log_size = size.log()
    scale = (C // H) ** -0.5
    with torch.no_grad():
        ref_att = mk.fusion_attention_reference(q, k, scale=scale, log_size=log_size)
        lse = torch.logsumexp(mk.attention_logits_reference(q, k, scale, log_size).float(), dim=-1)
    att_qk = mk.FusionAttention(received=ref_att.received, q=q, k=k, lse=lse, log_size=log_size, scale=scale)
    del ref_att
    return dict(B=B, T=T, C=C, H=H, r=r, t_out=t_out, x=x, attn=attn, size=size,
                attn_received=attn_received, dest=dest, v=v, q=q, k=k, log_size=log_size, scale=scale,
                att_qk=att_qk, lse=lse)


def op_call(op: str, i: dict):
    """(public op, its reference, args, kwargs) for one benchmark."""
    if op == "match":
        return mk.match, mk.match_reference, (i["x"], i["r"], i["attn_received"], i["size"]), {}
    if op == "merge":
        return (mk.merge, mk.merge_reference,
                (i["x"], i["dest"], i["t_out"], i["size"], i["attn_received"]), dict(mode=1))
    if op == "attention_received":
        return mk.attention_received, mk.attention_received_reference, (i["attn"],), {}
    if op == "fused_attention_output":
        return (mk.fused_attention_output, mk.fused_attention_output_reference,
                (i["attn"], i["v"], i["dest"], i["t_out"], i["size"], i["attn_received"]), dict(mode=1))
    if op == "fusion_attention":
        return (mk.fusion_attention, mk.fusion_attention_reference, (i["q"], i["k"]),
                dict(scale=i["scale"], log_size=i["log_size"]))
    if op == "fused_attention_output_qk":
        att = i["att_qk"]
        return (lambda *a, **k: mk.fused_attention_output_from(att, *a, **k),
                lambda *a, **k: mk.fused_attention_output_qk_reference(
                    att.q, att.k, att.lse, att.log_size, att.scale, *a, att.received, **k),
                (i["v"], i["dest"], i["t_out"], i["size"]), dict(mode=1))
    raise ValueError(op)


def _first(out):
    if isinstance(out, mk.FusionAttention):
        return out.received
    return out[0] if isinstance(out, tuple) else out


def _difference(out, ref) -> float:
    """Fraction of differing slots for ``dest``, max abs difference for floats
    (recorded, not asserted: correctness is the tests' job)."""
    out, ref = _first(out), _first(ref)
    if not out.is_floating_point():
        return (out != ref).float().mean().item()
    return (out.float() - ref.float()).abs().max().item()


def run_op(op, benchmark, shape_name, dtype_name, provider, bench_device, copy_bandwidth, smoke):
    i = make_inputs(shape_name, dtype_name, str(bench_device))
    public, reference, args, kwargs = op_call(op, i)
    if provider == "compiled":
        torch._dynamo.reset()  # a fresh cache per benchmark: no recompile limits across shapes
        compiled = torch.compile(reference, dynamic=False, backend=COMPILE_BACKEND)

        def fn():
            return compiled(*args, **kwargs)
    else:
        backend = provider  # "reference" or "triton"

        def fn():
            with mk.use_backend(backend):
                return public(*args, **kwargs)

    with torch.no_grad():
        try:
            out = fn()  # warm-up: compile / autotune / JIT outside the timing
        except mk.BackendUnavailable as exc:
            pytest.skip(str(exc))
        ref = reference(*args, **kwargs)
        difference = _difference(out, ref)
        del out, ref
        sync(bench_device)

        def target():
            fn()
            sync(bench_device)  # time the kernels, not their launch

        benchmark.group = f"{op} {shape_name} {dtype_name}"
        if smoke:
            benchmark.pedantic(target, rounds=1, iterations=1)
        else:
            benchmark(target)

    B, T, C, H, t_out = i["B"], i["T"], i["C"], i["H"], i["t_out"]
    nbytes = bytes_moved(op, B, T, C, H, t_out, DTYPES[dtype_name].itemsize)
    info = dict(op=op, provider=provider, shape=shape_name, B=B, T=T, C=C, H=H, r=i["r"], t_out=t_out,
                dtype=dtype_name, device=copy_bandwidth["device"], smoke=smoke,
                compile_backend=COMPILE_BACKEND if provider == "compiled" else None,
                bytes_moved=nbytes, bytes_formula=BYTES_FORMULA[op],
                copy_gbps=copy_bandwidth["gbps"], difference_vs_reference=difference)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        median_s = stats.stats.median
        info.update(median_ms=median_s * 1e3, gbps=nbytes / median_s / 1e9,
                    pct_of_copy_bw=100 * nbytes / median_s / 1e9 / copy_bandwidth["gbps"])
        n_flops = flops(op, B, T, C, H, t_out)
        if n_flops:
            info["tflops"] = n_flops / median_s / 1e12
    benchmark.extra_info.update(info)


@pytest.mark.bench
def test_match(benchmark, shape_name, dtype_name, provider, bench_device, copy_bandwidth, smoke):
    run_op("match", benchmark, shape_name, dtype_name, provider, bench_device, copy_bandwidth, smoke)


@pytest.mark.bench
def test_merge(benchmark, shape_name, dtype_name, provider, bench_device, copy_bandwidth, smoke):
    run_op("merge", benchmark, shape_name, dtype_name, provider, bench_device, copy_bandwidth, smoke)


@pytest.mark.bench
def test_attention_received(benchmark, shape_name, dtype_name, provider, bench_device, copy_bandwidth, smoke):
    run_op("attention_received", benchmark, shape_name, dtype_name, provider, bench_device, copy_bandwidth, smoke)


@pytest.mark.bench
def test_fused_attention_output(benchmark, shape_name, dtype_name, provider, bench_device, copy_bandwidth, smoke):
    run_op("fused_attention_output", benchmark, shape_name, dtype_name, provider, bench_device, copy_bandwidth, smoke)


@pytest.mark.bench
def test_fusion_attention(benchmark, shape_name, dtype_name, provider, bench_device, copy_bandwidth, smoke):
    run_op("fusion_attention", benchmark, shape_name, dtype_name, provider, bench_device, copy_bandwidth, smoke)


@pytest.mark.bench
def test_fused_attention_output_qk(benchmark, shape_name, dtype_name, provider, bench_device, copy_bandwidth, smoke):
    run_op("fused_attention_output_qk", benchmark, shape_name, dtype_name, provider, bench_device,
           copy_bandwidth, smoke)
