"""``mctf-bench``: throughput of random-init timm ViTs, baseline vs MCTF presets.

Runs on the best device available (CUDA if present, else CPU) and prints one
row per (model, dtype, preset, provider): tokens after the blocks, GFLOPs per
image counted by ``torch.utils.flop_counter``, images/s, speedup over the timm
baseline, the ideal speedup (baseline GFLOPs / MCTF GFLOPs) and the fraction of
it achieved, and peak memory.
Nothing is downloaded: models are random-init (throughput does not depend on
the weights' values, only on shapes; token counts are static).

Providers: ``timm`` (the unpatched model, SDPA attention; baseline rows),
``eager`` (MCTF on the eager reference ops), ``triton`` (MCTF on the Triton
kernels; CUDA only) and ``auto``. ``--compile`` / ``--cuda-graphs`` add a
``<provider>+compile`` / ``<provider>+cudagraphs`` row for each provider.
This module never imports Triton: it only names the backend.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

import mctf
from mctf_kernels import dispatch

DEFAULT_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224")
PRESETS = ("baseline", "mctf", "mctf-fast")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROVIDERS = ("timm", "eager", "triton", "auto")
DEFAULT_PROVIDERS = ("timm", "eager", "triton")
PROVIDER_BACKEND = {"eager": "reference", "triton": "triton", "auto": "auto"}  # MCTF providers
LEGACY_BACKEND_PROVIDER = {"reference": "eager", "triton": "triton", "auto": "auto"}
MCTF_OPS = ("match", "merge", "attention_received", "fused_attention_output")
SUITES = {
    # the paper's throughput table: DeiT-T/S/B at 224 and ViT-L/16 at 384, fp16 and bf16 autocast
    "paper": dict(
        models=("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "vit_large_patch16_384"),
        batch={"vit_large_patch16_384": 64}, default_batch=256, dtypes=("fp16", "bf16"), amp=True,
    ),
}
R_SWEEP_MODEL = "deit_small_patch16_224"
CPU_PEAK_NOTE = "CPU: peak_mem_mb is None (no per-row allocator peak); process_peak_rss_mb is the whole process's high-water RSS"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _version(dist: str) -> Optional[str]:
    try:  # metadata only: reading triton's version must not import it
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine() or "unknown")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def build_model(name: str, preset: str, device: torch.device, dtype: Optional[torch.dtype],
                model_kwargs: Optional[dict] = None, config: Optional["mctf.MCTFConfig"] = None):
    """Random-init timm model; ``dtype=None`` keeps fp32 weights (autocast runs)."""
    import timm

    model = timm.create_model(name, pretrained=False, **{"num_classes": 1000, **(model_kwargs or {})})
    model = model.to(device=device, dtype=dtype).eval()
    if config is not None:
        model = mctf.patch.timm(model, config)
    elif preset != "baseline":
        model = mctf.patch.timm(model, mctf.MCTFConfig.preset(preset, depth=len(model.blocks)))
    return model


def input_size(model) -> tuple:
    embed = getattr(model, "patch_embed", None)
    img_size = getattr(embed, "img_size", None)
    if img_size is not None:  # follows img_size overrides in --model-kwargs
        return (embed.proj.in_channels, *img_size)
    return tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))


def num_tokens(model) -> int:
    return model.patch_embed.num_patches + model.num_prefix_tokens


def gflops_per_image(model, images: torch.Tensor) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # the math backend decomposes attention into matmuls the counter sees on every
    # device (fused CPU attention kernels are not counted); the reference backend
    # because Triton kernels are invisible to the counter (same math either way)
    with torch.no_grad(), mctf.use_backend("reference"), sdpa_kernel(SDPBackend.MATH), \
            FlopCounterMode(display=False) as counter:
        model(images[:1])
    return counter.get_total_flops() / 1e9 / 2  # multiply-accumulates, the usual "FLOPs" of ViT papers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, min_seconds: float, max_iters: int):
    """(iterations, seconds) of ``step`` after ``warmup`` calls, synchronized."""
    for _ in range(warmup):
        step()
    _sync(device)
    iters, start = 0, time.perf_counter()
    while iters < max_iters and (iters == 0 or time.perf_counter() - start < min_seconds):
        step()
        iters += 1
        _sync(device)
    return iters, time.perf_counter() - start


def images_per_second(model, images: torch.Tensor, warmup: int, min_seconds: float, max_iters: int) -> float:
    """Kept for callers of the first version: plain forward passes, no autocast."""
    with torch.no_grad():
        iters, elapsed = time_steps(lambda: model(images), images.device, warmup, min_seconds, max_iters)
    return iters * images.shape[0] / elapsed


def token_summary(model, images: torch.Tensor) -> str:
    if not hasattr(model, "mctf_state"):
        return f"{num_tokens(model)} (all blocks)"
    start = num_tokens(model)
    counts = model.mctf_state.planned_tokens(start)
    return f"{start}->{counts[-1]} (" + ",".join(str(c) for c in counts) + ")"


def final_tokens(model) -> int:
    if not hasattr(model, "mctf_state"):
        return num_tokens(model)
    return model.mctf_state.planned_tokens(num_tokens(model))[-1]


# ---------------------------------------------------------------------------
# providers


def provider_label(provider: str, mode: str) -> str:
    return provider if mode == "plain" else f"{provider}+{mode}"


def triton_skip_reason(device: torch.device) -> Optional[str]:
    """Why the Triton providers cannot run here (None when they can)."""
    if device.type != "cuda":
        return "Triton kernels need CUDA (the interpreter is for tests, not benchmarks)"
    for op in MCTF_OPS:  # asks mctf_kernels; this module itself never imports triton
        reason = dispatch.triton_unavailable_reason(op, device, "triton")
        if reason:
            return reason
    return None


def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype], cache: bool = True):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype, cache_enabled=cache)


def _backend(provider: str):
    return contextlib.nullcontext() if provider == "timm" else mctf.use_backend(PROVIDER_BACKEND[provider])


def make_step(model, images, provider: str, mode: str, device, amp_dtype, compile_backend: str):
    """A no-grad forward of the whole batch for (provider, mode); compiles or
    captures on the way. Returns (step, setup seconds)."""
    start = time.perf_counter()
    if mode == "compile":
        torch._dynamo.reset()  # the backend choice is traced into the graph: never reuse another provider's
        fwd = torch.compile(model, backend=compile_backend)
    else:
        fwd = model

    def step():
        with torch.no_grad(), _backend(provider), _autocast(device, amp_dtype):
            fwd(images)

    if mode == "compile":
        step()  # compilation happens here, not in the timed loop
        _sync(device)
    elif mode == "cudagraphs":
        static = images.clone()

        def body():
            with torch.no_grad(), _backend(provider), _autocast(device, amp_dtype, cache=False):
                return model(static)

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm up (allocator, cuBLAS, Triton JIT) off the capture
            for _ in range(3):
                body()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = body()
        _sync(device)

        def step():  # noqa: F811 - replays read `static` and write `out`
            graph.replay()

        step.keep_alive = (graph, static, out)
    return step, time.perf_counter() - start


def measure(model, images, provider: str, mode: str, args, device, amp_dtype) -> Dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step, setup_s = make_step(model, images, provider, mode, device, amp_dtype, args.compile_backend)
    iters, elapsed = time_steps(step, device, args.warmup, args.seconds, args.max_iters)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return dict(images_per_s=iters * images.shape[0] / elapsed, iters=iters, seconds=elapsed,
                setup_s=setup_s if mode != "plain" else None, peak_mem_mb=peak)


def latency_ms(model, provider: str, device, amp_dtype, replays: int) -> Dict:
    """Batch-1 latency of one CUDA-graph replay (CUDA events around each)."""
    images = torch.randn(1, *input_size(model), device=device, dtype=next(model.parameters()).dtype)
    step, _ = make_step(model, images, provider, "cudagraphs", device, amp_dtype, "inductor")
    for _ in range(10):
        step()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return dict(median_ms=statistics.median(times), p90_ms=times[int(0.9 * (len(times) - 1))], replays=replays)


# ---------------------------------------------------------------------------
# the run


def _plan(args, device: torch.device) -> Dict:
    suite = SUITES[args.suite] if args.suite else None
    models = args.models or list(suite["models"] if suite else DEFAULT_MODELS)
    dtypes = args.dtype or list(suite["dtypes"] if suite else ["fp16" if device.type == "cuda" else "fp32"])
    amp = args.amp or bool(suite and suite["amp"])

    def batch_for(model: str) -> int:
        if args.batch_size:
            return args.batch_size
        if suite:
            return suite["batch"].get(model, suite["default_batch"])
        return 256 if device.type == "cuda" else 8

    if args.providers:
        providers = list(dict.fromkeys(args.providers))
    elif args.backend:  # the first version's flag: one MCTF backend beside the baseline
        providers = ["timm", LEGACY_BACKEND_PROVIDER[args.backend]]
    else:
        providers = list(DEFAULT_PROVIDERS)
    modes = ["plain"] + (["compile"] if args.compile else []) + (["cudagraphs"] if args.cuda_graphs else [])
    return dict(models=models, dtypes=dtypes, amp=amp, batch_for=batch_for, providers=providers, modes=modes)


def _skips(plan: Dict, device: torch.device, args) -> Dict[str, str]:
    """provider label -> one-line reason it is not run on this machine."""
    skipped = {}
    triton_reason = triton_skip_reason(device) if "triton" in plan["providers"] else None
    for provider in plan["providers"]:
        for mode in plan["modes"]:
            label = provider_label(provider, mode)
            if provider == "triton" and triton_reason:
                skipped[label] = triton_reason
            elif mode == "cudagraphs" and device.type != "cuda":
                skipped[label] = "CUDA graphs need CUDA"
    return skipped


def _precision(dtype_name: str, amp: bool):
    """(weights/input dtype, autocast dtype)."""
    dtype = DTYPES[dtype_name]
    if amp and dtype != torch.float32:
        return torch.float32, dtype
    return dtype, None


def _row_jobs(plan: Dict, presets: List[str]):
    for preset in presets:
        for provider in plan["providers"]:
            if (preset == "baseline") != (provider == "timm"):
                continue  # timm runs the baseline; the MCTF providers run the presets
            for mode in plan["modes"]:
                yield preset, provider, mode


def _measure_row(model, images, preset, provider, mode, args, device, amp_dtype, skipped) -> Dict:
    label = provider_label(provider, mode)
    row = dict(provider=label, mode=mode, backend=None if provider == "timm" else PROVIDER_BACKEND[provider])
    if label in skipped:
        row.update(images_per_s=None, skipped=skipped[label])
        return row
    try:
        row.update(measure(model, images, provider, mode, args, device, amp_dtype))
    except mctf.BackendUnavailable as exc:
        row.update(images_per_s=None, skipped=str(exc).splitlines()[0])
        _log(f"  {label}: skipped: {row['skipped']}")
    except Exception as exc:  # one failing row must not lose the others' numbers
        if args.strict:
            raise
        row.update(images_per_s=None, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        _log(f"  {label}: ERROR {row['error']}")
    return row


def add_ratios(rows: List[Dict]) -> None:
    """speedup vs the timm baseline (plain), ideal = baseline GFLOPs / GFLOPs,
    achieved/ideal, and vs_eager (same preset, the eager reference, plain)."""
    def find(row, **key):
        return next((b for b in rows if all(b.get(k) == v for k, v in key.items())
                     and b["model"] == row["model"] and b["dtype"] == row["dtype"]
                     and b.get("images_per_s")), None)

    for row in rows:
        base = find(row, preset="baseline", provider="timm")
        eager = find(row, preset=row["preset"], provider="eager") if row["preset"] != "baseline" else None
        ips = row.get("images_per_s")
        row["speedup"] = ips / base["images_per_s"] if base and ips else None
        row["flop_ratio"] = base["gflops"] / row["gflops"] if base and row.get("gflops") else None
        row["ideal_speedup"] = row["flop_ratio"]
        row["achieved_over_ideal"] = row["speedup"] / row["ideal_speedup"] if row["speedup"] and row["ideal_speedup"] else None
        row["vs_eager"] = ips / eager["images_per_s"] if eager and ips else None


def run(args) -> List[Dict]:
    return run_all(args)["rows"]


def run_all(args) -> Dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    plan = _plan(args, device)
    model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    name = device_name(device)
    skipped = _skips(plan, device, args)
    _log(f"mctf-bench: device={device} ({name}) dtypes={','.join(plan['dtypes'])} amp={plan['amp']} "
         f"providers={','.join(provider_label(p, m) for p in plan['providers'] for m in plan['modes'])}")
    for label, reason in skipped.items():
        _log(f"skipped {label}: {reason}")

    rows: List[Dict] = []
    flops_cache: Dict = {}
    for model_name in plan["models"]:
        batch = plan["batch_for"](model_name)
        for dtype_name in plan["dtypes"]:
            dtype, amp_dtype = _precision(dtype_name, plan["amp"])
            for preset in args.presets:
                jobs = [j for j in _row_jobs(plan, [preset])]
                if not jobs:
                    continue
                _log(f"{model_name} {dtype_name} {preset} batch={batch} ...")
                model = build_model(model_name, preset, device, dtype, model_kwargs)
                images = torch.randn(batch, *input_size(model), device=device, dtype=dtype)
                key = (model_name, preset)
                if key not in flops_cache:
                    flops_cache[key] = gflops_per_image(model, images)
                common = dict(model=model_name, preset=preset, tokens=token_summary(model, images),
                              final_tokens=final_tokens(model), gflops=flops_cache[key], device=str(device),
                              device_name=name, dtype=dtype_name, amp=amp_dtype is not None, batch=batch)
                for _, provider, mode in jobs:
                    row = dict(common, **_measure_row(model, images, preset, provider, mode, args, device,
                                                      amp_dtype, skipped))
                    if row.get("images_per_s"):
                        _log(f"  {row['provider']}: {row['images_per_s']:.1f} img/s")
                    rows.append(row)
                del model, images
    add_ratios(rows)

    result = dict(rows=rows, skipped=[dict(provider=k, reason=v) for k, v in skipped.items()])
    if args.r_sweep:
        result["r_sweep"] = r_sweep(args, plan, device, model_kwargs, skipped)
    if args.latency:
        result["latency"] = latency_rows(args, plan, device, model_kwargs, skipped)
    result["meta"] = metadata(args, device, name, plan, model_kwargs)
    return result


def r_sweep(args, plan, device, model_kwargs, skipped) -> Dict:
    """images/s of one model against r (the ``mctf`` preset's layers), plain providers only."""
    model_name = args.r_sweep_model
    dtype_name = plan["dtypes"][0]
    dtype, amp_dtype = _precision(dtype_name, plan["amp"])
    batch = plan["batch_for"](model_name)
    _log(f"r sweep: {model_name} {dtype_name} batch={batch} r={args.r_sweep}")
    out = dict(model=model_name, dtype=dtype_name, amp=amp_dtype is not None, batch=batch, preset="mctf",
               baseline=None, points=[])
    if "timm" in plan["providers"]:
        model = build_model(model_name, "baseline", device, dtype, model_kwargs)
        images = torch.randn(batch, *input_size(model), device=device, dtype=dtype)
        out["baseline"] = dict(gflops=gflops_per_image(model, images), final_tokens=final_tokens(model),
                               **_measure_row(model, images, "baseline", "timm", "plain", args, device,
                                              amp_dtype, skipped))
        del model, images
    for r in args.r_sweep:
        r = int(r) if float(r).is_integer() else float(r)
        model = build_model(model_name, "baseline", device, dtype, model_kwargs)
        model = mctf.patch.timm(model, mctf.MCTFConfig.preset("mctf", depth=len(model.blocks), r=r))
        images = torch.randn(batch, *input_size(model), device=device, dtype=dtype)
        gflops = gflops_per_image(model, images)
        base = out["baseline"]
        for provider in plan["providers"]:
            if provider == "timm":
                continue
            point = dict(r=r, gflops=gflops, final_tokens=final_tokens(model),
                         **_measure_row(model, images, "mctf", provider, "plain", args, device, amp_dtype, skipped))
            point["speedup"] = (point["images_per_s"] / base["images_per_s"]
                                if base and base.get("images_per_s") and point.get("images_per_s") else None)
            point["ideal_speedup"] = base["gflops"] / gflops if base else None
            if point.get("images_per_s"):
                _log(f"  r={r} {point['provider']}: {point['images_per_s']:.1f} img/s")
            out["points"].append(point)
        del model, images
    return out


def latency_rows(args, plan, device, model_kwargs, skipped) -> Dict:
    if device.type != "cuda":
        reason = "batch-1 latency uses CUDA graphs, which need CUDA"
        _log(f"skipped latency: {reason}")
        return dict(skipped=reason, rows=[])
    rows = []
    for model_name in plan["models"]:
        for dtype_name in plan["dtypes"]:
            dtype, amp_dtype = _precision(dtype_name, plan["amp"])
            for preset in args.presets:
                providers = [pr for pr in plan["providers"] if (preset == "baseline") == (pr == "timm")]
                if not providers:
                    continue
                model = build_model(model_name, preset, device, dtype, model_kwargs)
                for provider in providers:
                    label = provider_label(provider, "cudagraphs")
                    row = dict(model=model_name, dtype=dtype_name, preset=preset, provider=label, batch=1)
                    reason = skipped.get(provider_label(provider, "plain"))
                    if reason:
                        row["skipped"] = reason
                    else:
                        try:
                            row.update(latency_ms(model, provider, device, amp_dtype, args.latency_replays))
                            _log(f"  latency {model_name} {dtype_name} {preset} {label}: {row['median_ms']:.3f} ms")
                        except Exception as exc:
                            if args.strict:
                                raise
                            row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    rows.append(row)
                del model
    return dict(rows=rows)


def metadata(args, device, name, plan, model_kwargs) -> Dict:
    now = datetime.datetime.now()
    meta = dict(
        device=str(device), device_type=device.type, device_name=name,
        torch=torch.__version__, triton=_version("triton"), timm=_version("timm"), mctf=mctf.__version__,
        cuda=torch.version.cuda if device.type == "cuda" else None,
        python=platform.python_version(), platform=platform.platform(),
        date=now.strftime("%Y-%m-%d"), datetime=now.isoformat(timespec="seconds"),
        threads=torch.get_num_threads(), argv=list(getattr(args, "argv", [])), suite=args.suite, amp=plan["amp"],
        model_kwargs=model_kwargs, compile_backend=args.compile_backend if args.compile else None,
        seconds_per_row=args.seconds, warmup=args.warmup,
    )
    if device.type == "cpu":
        import resource  # Linux/macOS; ru_maxrss is KiB on Linux

        meta["process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        meta["memory_note"] = CPU_PEAK_NOTE
    if hasattr(os, "getloadavg"):  # a shared machine's timings are only as good as its load
        meta["load_average_1_5_15"] = list(os.getloadavg())
    return meta


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(rows: List[Dict]) -> str:
    header = (f"{'model':<26} {'dtype':<5} {'preset':<10} {'provider':<18} {'GFLOPs':>7} {'img/s':>9} "
              f"{'speedup':>8} {'ideal':>6} {'ach/id':>6} {'peakMiB':>8}  tokens after each block")
    lines = [header, "-" * len(header)]
    for r in rows:
        ips = r.get("images_per_s")
        note = f"skipped: {r['skipped']}" if r.get("skipped") else (f"error: {r['error']}" if r.get("error") else r["tokens"])
        lines.append(
            f"{r['model']:<26} {r['dtype']:<5} {r['preset']:<10} {r['provider']:<18} {r['gflops']:>7.2f} "
            f"{_fmt(ips, '9.1f'):>9} {_fmt(r.get('speedup'), '.2f', 'x'):>8} {_fmt(r.get('ideal_speedup'), '.2f', 'x'):>6} "
            f"{_fmt(r.get('achieved_over_ideal'), '.2f'):>6} {_fmt(r.get('peak_mem_mb'), '8.0f'):>8}  {note}"
        )
    return "\n".join(lines)


def default_results_path(result: Dict, results_dir: str) -> str:
    meta = result["meta"]
    return os.path.join(results_dir, f"{slug(meta['device_name'])}-{meta['date']}.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mctf-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", help=f"timm model names (default {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--suite", choices=sorted(SUITES),
                   help="paper: DeiT-T/S/B@224 and ViT-L/16@384, batch 256 (64 for ViT-L), fp16 and bf16 autocast")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    p.add_argument("--providers", nargs="+", choices=PROVIDERS,
                   help=f"default {' '.join(DEFAULT_PROVIDERS)}; timm runs the baseline preset, the others MCTF")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows (<provider>+compile)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--cuda-graphs", action="store_true", help="add CUDA-graph rows (<provider>+cudagraphs); CUDA only")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--amp", action="store_true", help="fp32 weights under torch.autocast(dtype) instead of casting the model")
    p.add_argument("--batch-size", type=int, help="default 256 on CUDA, 8 on CPU (the suite's own batches)")
    p.add_argument("--backend", choices=mctf.BACKENDS,
                   help="shorthand for --providers timm <eager|triton|auto> (reference = eager)")
    p.add_argument("--model-kwargs", help='JSON passed to timm.create_model, e.g. \'{"img_size": 64, "depth": 2}\'')
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seconds", type=float, default=2.0, help="minimum timed seconds per row")
    p.add_argument("--max-iters", type=int, default=200)
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--r-sweep", nargs="+", type=float, metavar="R",
                   help="also measure images/s against r (mctf preset's layers), e.g. 0 4 8 12 16 20")
    p.add_argument("--r-sweep-model", default=R_SWEEP_MODEL)
    p.add_argument("--latency", action="store_true", help="batch-1 latency with CUDA graphs (CUDA only)")
    p.add_argument("--latency-replays", type=int, default=200)
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--save", action="store_true",
                   help="write the results to <results-dir>/<device-name>-<date>.json (unless --json names a file)")
    p.add_argument("--results-dir", default=os.path.join("bench", "results"))
    p.add_argument("--strict", action="store_true", help="raise on a failing row instead of recording the error")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.providers and args.backend:
        p.error("--backend is a shorthand for --providers; give one of them")
    args.argv = sys.argv[1:] if argv is None else list(argv)
    result = run_all(args)
    print(format_table(result["rows"]))
    path = args.json or (default_results_path(result, args.results_dir) if args.save else None)
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        meta = result["meta"]
        payload = dict(meta=meta, torch=meta["torch"], date=meta["date"], **{k: v for k, v in result.items() if k != "meta"})
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        _log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
