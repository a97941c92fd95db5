"""mctf-bench: throughput of random-init timm ViTs, baseline vs MCTF presets.

Runs on the best device available (CUDA if present, else CPU) and prints one row
per (model, dtype, preset, provider): tokens after the blocks, GFLOPs per image
(torch.utils.flop_counter), the median images/s of interleaved timed repeats with
their min-max range, the speedup over the timm baseline, the ideal speedup
(baseline GFLOPs / MCTF GFLOPs), the fraction of it achieved, and peak memory.
A row whose repeats spread widely, or whose speedup beats the FLOP ideal, is
flagged noisy: it is not a result. How we measure: bench/NOTES.md.

Nothing is downloaded: models are random-init (throughput depends on shapes, not
on the weights' values; token counts are static). Input: one random batch already
on the device, so no data loading is timed.

Providers: timm (the unpatched model, SDPA attention; baseline rows), eager (MCTF
on the eager reference ops), triton (MCTF on the Triton kernels; CUDA only) and
auto. --compile / --cuda-graphs add <provider>+compile / <provider>+cudagraphs rows.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

from mctf.cli import common
from mctf.cli.common import UsageError, log

DEFAULT_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224")
PRESETS = ("baseline", "mctf", "mctf-fast")
DTYPES = ("fp32", "fp16", "bf16")
PROVIDERS = ("timm", "eager", "triton", "auto")
DEFAULT_PROVIDERS = ("timm", "eager", "triton")
PROVIDER_BACKEND = {"eager": "reference", "triton": "triton", "auto": "auto"}  # the MCTF providers
BACKEND_PROVIDER = {"reference": "eager", "triton": "triton", "auto": "auto"}
MCTF_OPS = ("match", "merge", "attention_received", "fused_attention_output")
SUITES = {
    # the paper's throughput table: DeiT-T/S/B at 224 and ViT-L/16 at 384, fp16 and bf16 autocast
    "paper": dict(
        models=("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "vit_large_patch16_384"),
        batch={"vit_large_patch16_384": 64}, default_batch=256, dtypes=("fp16", "bf16"), amp=True,
    ),
}
CPU_PEAK_NOTE = "CPU: peak_mem_mb is None (no per-row allocator peak); process_peak_rss_mb is the whole process's high-water RSS"
METHOD_NOTE = ("img/s: median of {repeats} interleaved timed repeats after warmup (range: min-max), forward passes "
               "on one random batch already on the device (no data loading); speedup: median of the per-repeat "
               "ratios to the baseline measured side by side. bench/NOTES.md, 'How we measure'.")


# ---------------------------------------------------------------------------
# arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mctf-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=common.HelpFormatter)
    p.add_argument("-m", "--models", nargs="+", metavar="NAME",
                   help=f"timm model names; default: {' '.join(DEFAULT_MODELS)}")
    p.add_argument("--suite", choices=sorted(SUITES),
                   help="paper: DeiT-T/S/B@224 and ViT-L/16@384, batch 256 (64 for ViT-L), fp16 and bf16 autocast; "
                        "default: none")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS + common.TOME_PRESETS,
                   help="baseline is the unpatched timm model; mctf and mctf-fast are MCTFConfig.preset(...); "
                        "tome-r<N> is Token Merging (ToMeConfig(r=N)) on the same kernels")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS,
                   help=f"timm runs the baseline, the others MCTF; default: {' '.join(DEFAULT_PROVIDERS)} "
                        f"(triton skipped without CUDA)")
    p.add_argument("--backend", choices=common.BACKENDS,
                   help="shorthand for --providers timm <eager|triton|auto> (reference = eager); "
                        f"default: ${common.BACKEND_ENV} if set, else all providers")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows (<provider>+compile)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    p.add_argument("--cuda-graphs", action="store_true", help="add CUDA-graph rows (<provider>+cudagraphs); CUDA only")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else cpu), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", nargs="+", choices=DTYPES, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--amp", action="store_true",
                   help="fp32 weights under torch.autocast(dtype) instead of casting the model")
    p.add_argument("-b", "--batch-size", type=int, help="default: 256 on CUDA, 8 on CPU (the suite's own batches)")
    common.add_model_kwargs_argument(p)
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: torch's")
    p.add_argument("--r-sweep", nargs="+", metavar="R",
                   help="also measure images/s against r (the mctf preset's layers), e.g. 0 4 8 12 16 20; "
                        "default: none")
    p.add_argument("--r-sweep-method", choices=("mctf", "tome"),
                   help="what --r-sweep patches: mctf (the mctf preset's layers at each r) or tome "
                        "(ToMeConfig(r), every block; whole numbers only); default: mctf")
    p.add_argument("--r-sweep-model", help="model of the r sweep; default: the first of --models")
    p.add_argument("--latency", action="store_true", help="batch-1 latency with CUDA graphs (CUDA only)")
    p.add_argument("--latency-replays", type=int, default=200, help="replays timed for --latency")
    common.add_timing_arguments(p)
    g = p.add_argument_group("output")
    g.add_argument("--json", help="write the results to this JSON file; default: none")
    g.add_argument("--save", action="store_true",
                   help="write the results to <results-dir>/<device-name>-<date>.json (unless --json names a file)")
    g.add_argument("--results-dir", default=os.path.join("bench", "results"), help="where --save writes")
    g.add_argument("--strict", action="store_true", help="raise on a failing row instead of recording the error")
    return p


def check_args(args) -> None:
    """Checks that need neither torch nor timm."""
    if args.providers and args.backend:
        raise UsageError("--backend is a shorthand for --providers; give one of them")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be >= 1")
    args.model_kwargs = common.parse_model_kwargs(args.model_kwargs)
    args.r_sweep = common.parse_r_values(args.r_sweep, "--r-sweep") if args.r_sweep else None
    if args.r_sweep_method is not None and not args.r_sweep:
        raise UsageError("--r-sweep-method chooses what --r-sweep patches: give --r-sweep R ... too")
    args.r_sweep_method = args.r_sweep_method or "mctf"
    if args.r_sweep and args.r_sweep_method == "tome":
        bad = [v for v in args.r_sweep if not isinstance(v, int)]
        if bad:
            raise UsageError(f"--r-sweep: ToMe merges a whole number of tokens per block, got {bad}")
    args.timing = common.timing_options(args)
    env_backend = common.backend_from_env()
    if args.backend is None and not args.providers and env_backend is not None:
        args.backend = env_backend
        log(f"mctf-bench: {common.BACKEND_ENV}={env_backend}: providers timm and {BACKEND_PROVIDER[env_backend]}")
    common.check_output_path(args.json, "--json")


# ---------------------------------------------------------------------------
# providers and steps


def provider_label(provider: str, mode: str) -> str:
    return provider if mode == "plain" else f"{provider}+{mode}"


def triton_skip_reason(device) -> Optional[str]:
    """Why the Triton providers cannot run here (None when they can)."""
    from mctf_kernels import dispatch

    if device.type != "cuda":
        return "Triton kernels need CUDA (the interpreter is for tests, not benchmarks)"
    for op in MCTF_OPS:
        reason = dispatch.triton_unavailable_reason(op, device, "triton")
        if reason:
            return reason
    return None


def _autocast(device, amp_dtype, cache: bool = True):
    import torch

    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype, cache_enabled=cache)


def _backend(provider: str):
    import mctf

    return contextlib.nullcontext() if provider == "timm" else mctf.use_backend(PROVIDER_BACKEND[provider])


def make_step(model, images, provider: str, mode: str, device, amp_dtype, compile_backend: str):
    """A no-grad forward of the whole batch for (provider, mode); compiles or captures on the way.
    Returns (step, setup seconds)."""
    import torch

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
        common._sync(device)
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
        common._sync(device)

        def step():  # noqa: F811 - replays read `static` and write `out`
            graph.replay()

        step.keep_alive = (graph, static, out)
    return step, time.perf_counter() - start


def latency_ms(model, provider: str, device, amp_dtype, replays: int) -> Dict:
    """Batch-1 latency of one CUDA-graph replay (CUDA events around each)."""
    import torch

    images = torch.randn(1, *common.input_size(model), device=device, dtype=next(model.parameters()).dtype)
    step, _ = make_step(model, images, provider, "cudagraphs", device, amp_dtype, "inductor")
    for _ in range(10):
        step()
    times = []
    for _ in range(replays):
        times.append(common.timed(step, 1, device) * 1e3)
    times.sort()
    return dict(median_ms=statistics.median(times), p90_ms=times[int(0.9 * (len(times) - 1))],
                min_ms=times[0], max_ms=times[-1], replays=replays)


# ---------------------------------------------------------------------------
# the run


def _plan(args, device) -> Dict:
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
    elif args.backend:
        providers = ["timm", BACKEND_PROVIDER[args.backend]]
    else:
        providers = list(DEFAULT_PROVIDERS)
    modes = ["plain"] + (["compile"] if args.compile else []) + (["cudagraphs"] if args.cuda_graphs else [])
    return dict(models=models, dtypes=dtypes, amp=amp, batch_for=batch_for, providers=providers, modes=modes)


def _skips(plan: Dict, device, explicit_triton: bool) -> Dict[str, str]:
    """provider label -> one-line reason it is not run on this machine."""
    skipped = {}
    triton_reason = triton_skip_reason(device) if "triton" in plan["providers"] else None
    if triton_reason and explicit_triton:
        raise UsageError(f"provider triton cannot run on {device}: {triton_reason}")
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
    import torch

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    if amp and dtype != torch.float32:
        return torch.float32, dtype
    return dtype, None


def _check_models(args, plan) -> None:
    """Every model name known to timm, and patchable when an MCTF preset is asked for, before any weights."""
    mctf_wanted = any(p != "baseline" for p in args.presets) or bool(args.r_sweep)
    names = list(plan["models"]) + ([args.r_sweep_model] if args.r_sweep and args.r_sweep_model else [])
    for name in dict.fromkeys(names):
        common.check_supported(name, args.model_kwargs,
                               lambda depth: common.preset_config("mctf", depth) if mctf_wanted else None)


def _build(name: str, preset: str, device, dtype, model_kwargs: Dict, config=None):
    model = common.create_model(name, {"num_classes": 1000, **model_kwargs}).to(device=device, dtype=dtype)
    config = config if config is not None else common.preset_config(preset, len(model.blocks))
    return common.patch_model(model, config)


def _error_text(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


class _Row:
    """One measured line: its step, labels and what is known before timing."""

    def __init__(self, key: str, model, info: Dict, provider: str, mode: str):
        self.key, self.model, self.provider, self.mode = key, model, provider, mode
        self.info = dict(info, provider=provider_label(provider, mode), mode=mode,
                         backend=None if provider == "timm" else PROVIDER_BACKEND[provider])
        self.step = None
        self.mem_base = 0


def _measure_rows(rows: List[_Row], images, args, device, amp_dtype, skipped, interleave: bool) -> None:
    """Build every row's step, then time them with the shared methodology; results land in row.info."""
    import torch

    import mctf

    live = []
    for row in rows:
        label = row.info["provider"]
        if label in skipped:
            row.info.update(images_per_s=None, skipped=skipped[label])
            continue
        try:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                row.mem_base = torch.cuda.memory_allocated(device)
            row.step, setup_s = make_step(row.model, images, row.provider, row.mode, device, amp_dtype,
                                          args.compile_backend)
            row.info["setup_s"] = setup_s if row.mode != "plain" else None
            live.append(row)
        except mctf.BackendUnavailable as exc:
            row.info.update(images_per_s=None, skipped=str(exc).splitlines()[0])
            log(f"  {label}: skipped: {row.info['skipped']}")
        except Exception as exc:  # one failing row must not lose the others' numbers
            if args.strict:
                raise
            row.info.update(images_per_s=None, error=_error_text(exc))
            log(f"  {label}: ERROR {row.info['error']}")
    groups = [live] if interleave else [[r] for r in live]
    for group in groups:
        steps = {r.key: r.step for r in group}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            timings = common.measure_interleaved(steps, device, **args.timing)
        except Exception as exc:
            if args.strict:
                raise
            for r in group:
                r.info.update(images_per_s=None, error=_error_text(exc))
            log(f"  ERROR {_error_text(exc)}")
            continue
        for r in group:
            t = timings[r.key]
            r.info.update(common.summarize(t["seconds_per_iter"], images.shape[0]))
            r.info.update(seconds_per_iter=t["seconds_per_iter"], iters_per_repeat=t["iters_per_repeat"],
                          warmup_iters=t["warmup"]["iters"], warmup_stable=t["warmup"]["stable"],
                          interleaved=len(group) > 1)
            if device.type == "cuda":  # weights + input + what the forward allocated beyond them (an upper bound
                # when rows share a group: the peak is the group's)
                weights = sum(p.numel() * p.element_size() for p in r.model.parameters())
                extra = max(0, torch.cuda.max_memory_allocated(device) - r.mem_base)
                r.info["peak_mem_mb"] = (weights + images.numel() * images.element_size() + extra) / 2**20
            else:
                r.info["peak_mem_mb"] = None
            log(f"  {r.info['provider']:<16} {r.info['preset']:<10} {r.info['images_per_s']:9.1f} img/s "
                f"(range {r.info['ips_min']:.1f}-{r.info['ips_max']:.1f})")
        for r in group:
            r.step = None  # release compiled graphs and captures


def add_ratios(rows: List[Dict], max_spread: float) -> None:
    """speedup vs the timm baseline (plain) and vs_eager (same preset, eager, plain): the median of
    the per-repeat ratios when both rows were timed side by side, else the ratio of medians;
    ideal = baseline GFLOPs / GFLOPs; achieved/ideal; then the noisy flag."""
    def find(row, **key):
        return next((b for b in rows if all(b.get(k) == v for k, v in key.items())
                     and b["model"] == row["model"] and b["dtype"] == row["dtype"]
                     and b.get("images_per_s")), None)

    def ratio(row, ref):
        if not ref or not row.get("images_per_s"):
            return dict(ratio=None, ratio_min=None, ratio_max=None)
        if row.get("interleaved") and ref.get("interleaved") and len(row["seconds_per_iter"]) == len(ref["seconds_per_iter"]):
            return common.paired_ratio(row["seconds_per_iter"], ref["seconds_per_iter"])
        value = row["images_per_s"] / ref["images_per_s"]
        return dict(ratio=value, ratio_min=None, ratio_max=None)

    for row in rows:
        base = find(row, preset="baseline", provider="timm")
        eager = find(row, preset=row["preset"], provider="eager") if row["preset"] != "baseline" else None
        s = ratio(row, base)
        row.update(speedup=s["ratio"], speedup_min=s["ratio_min"], speedup_max=s["ratio_max"])
        row["flop_ratio"] = base["gflops"] / row["gflops"] if base and row.get("gflops") else None
        row["ideal_speedup"] = row["flop_ratio"]
        row["achieved_over_ideal"] = (row["speedup"] / row["ideal_speedup"]
                                      if row["speedup"] and row["ideal_speedup"] else None)
        row["vs_eager"] = ratio(row, eager)["ratio"]
        if row.get("images_per_s"):
            reasons = common.noisy_reasons(row.get("spread"), max_spread, row["achieved_over_ideal"],
                                           row.get("warmup_stable"), row.get("repeats", 0))
            row["noisy"], row["noisy_reasons"] = bool(reasons), reasons


def run_all(args) -> Dict:
    import torch

    device = common.resolve_device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    plan = _plan(args, device)
    explicit_triton = "triton" in (args.providers or []) or args.backend == "triton"
    skipped = _skips(plan, device, explicit_triton)
    if args.r_sweep and not args.r_sweep_model:
        args.r_sweep_model = plan["models"][0]
    _check_models(args, plan)
    name = common.device_name(device)
    log(f"mctf-bench: device={device} ({name}) dtypes={','.join(plan['dtypes'])} amp={plan['amp']} "
        f"providers={','.join(provider_label(p, m) for p in plan['providers'] for m in plan['modes'])}")
    for label, reason in skipped.items():
        log(f"skipped {label}: {reason}")

    results: List[Dict] = []
    for model_name in plan["models"]:
        batch = plan["batch_for"](model_name)
        for dtype_name in plan["dtypes"]:
            dtype, amp_dtype = _precision(dtype_name, plan["amp"])
            log(f"{model_name} {dtype_name} batch={batch}: building {', '.join(args.presets)} ...")
            rows: List[_Row] = []
            images = None
            for preset in args.presets:
                providers = [p for p in plan["providers"] if (preset == "baseline") == (p == "timm")]
                if not providers:
                    continue  # timm runs the baseline; the MCTF providers run the presets
                model = _build(model_name, preset, device, dtype, args.model_kwargs)
                if images is None:
                    images = torch.randn(batch, *common.input_size(model), device=device, dtype=dtype)
                tokens = common.planned_tokens(model)
                info = dict(model=model_name, preset=preset, gflops=common.gflops_per_image(model, images),
                            tokens=_token_summary(model, tokens), final_tokens=tokens[-1], device=str(device),
                            device_name=name, dtype=dtype_name, amp=amp_dtype is not None, batch=batch)
                for provider in providers:
                    for mode in plan["modes"]:
                        rows.append(_Row(f"{preset}/{provider_label(provider, mode)}", model, info, provider, mode))
            if not rows:
                continue
            # plain and CUDA-graph rows interleave; compiled rows are timed one by one (each starts
            # from a fresh dynamo cache, see make_step)
            _measure_rows([r for r in rows if r.mode != "compile"], images, args, device, amp_dtype, skipped,
                          interleave=True)
            _measure_rows([r for r in rows if r.mode == "compile"], images, args, device, amp_dtype, skipped,
                          interleave=False)
            results.extend(r.info for r in rows)
            del rows, images
    add_ratios(results, args.max_spread)

    out = dict(rows=results, skipped=[dict(provider=k, reason=v) for k, v in skipped.items()])
    if args.r_sweep:
        out["r_sweep"] = r_sweep(args, plan, device, skipped)
    if args.latency:
        out["latency"] = latency_rows(args, plan, device, skipped)
    out["meta"] = metadata(args, device, plan)
    return out


def _token_summary(model, tokens: List[int]) -> str:
    start = common.num_tokens(model)
    if not hasattr(model, "mctf_state"):
        return f"{start} (all blocks)"
    return f"{start}->{tokens[-1]} (" + ",".join(str(c) for c in tokens) + ")"


def r_sweep(args, plan, device, skipped) -> Dict:
    """images/s of one model against r (the mctf preset's layers, or ToMe in every block with
    --r-sweep-method tome), plain providers, every r and the baseline interleaved; one patched
    model re-patched (untimed) before each of its repeats."""
    import torch

    import mctf

    model_name = args.r_sweep_model
    dtype_name = plan["dtypes"][0]
    dtype, amp_dtype = _precision(dtype_name, plan["amp"])
    batch = plan["batch_for"](model_name)
    method = args.r_sweep_method
    log(f"r sweep: {model_name} {dtype_name} batch={batch} method={method} r={args.r_sweep}")
    out = dict(model=model_name, dtype=dtype_name, amp=amp_dtype is not None, batch=batch, preset=method,
               baseline=None, points=[])
    base_model = _build(model_name, "baseline", device, dtype, args.model_kwargs)
    images = torch.randn(batch, *common.input_size(base_model), device=device, dtype=dtype)
    model = _build(model_name, "baseline", device, dtype, args.model_kwargs)
    depth = len(model.blocks)
    steps, setups, info = {}, {}, {}
    if "timm" in plan["providers"]:
        steps["baseline"], _ = make_step(base_model, images, "timm", "plain", device, amp_dtype, "inductor")
        info["baseline"] = dict(gflops=common.gflops_per_image(base_model, images),
                                final_tokens=common.num_tokens(base_model), provider="timm")
    for r in args.r_sweep:
        config = mctf.ToMeConfig(r=r) if method == "tome" else mctf.MCTFConfig.preset("mctf", depth=depth, r=r)
        common.patch_model(model, config)
        gflops, tokens = common.gflops_per_image(model, images), common.planned_tokens(model)[-1]
        for provider in plan["providers"]:
            if provider == "timm":
                continue
            key = f"r={r}/{provider}"
            point = dict(r=r, gflops=gflops, final_tokens=tokens, provider=provider)
            if provider in skipped:
                out["points"].append(dict(point, images_per_s=None, skipped=skipped[provider]))
                continue
            steps[key], _ = make_step(model, images, provider, "plain", device, amp_dtype, "inductor")
            setups[key] = (lambda c=config: mctf.patch.timm(model, c))
            info[key] = point
    timings = common.measure_interleaved(steps, device, setups=setups, **args.timing)
    base_t = timings.get("baseline")
    for key, t in timings.items():
        entry = dict(info[key], **common.summarize(t["seconds_per_iter"], batch),
                     warmup_stable=t["warmup"]["stable"], seconds_per_iter=t["seconds_per_iter"])
        if key == "baseline":
            out["baseline"] = entry
            continue
        if base_t:
            s = common.paired_ratio(t["seconds_per_iter"], base_t["seconds_per_iter"])
            entry.update(speedup=s["ratio"], speedup_min=s["ratio_min"], speedup_max=s["ratio_max"],
                         ideal_speedup=info["baseline"]["gflops"] / entry["gflops"])
            entry["achieved_over_ideal"] = entry["speedup"] / entry["ideal_speedup"]
        else:
            entry.update(speedup=None, ideal_speedup=None, achieved_over_ideal=None)
        reasons = common.noisy_reasons(entry["spread"], args.max_spread, entry["achieved_over_ideal"],
                                       entry["warmup_stable"], entry["repeats"])
        entry.update(noisy=bool(reasons), noisy_reasons=reasons)
        log(f"  r={entry['r']} {entry['provider']}: {entry['images_per_s']:.1f} img/s")
        out["points"].append(entry)
    out["points"].sort(key=lambda p: (p["provider"], p["r"]))
    return out


def latency_rows(args, plan, device, skipped) -> Dict:
    if device.type != "cuda":
        reason = "batch-1 latency uses CUDA graphs, which need CUDA"
        log(f"skipped latency: {reason}")
        return dict(skipped=reason, rows=[])
    rows = []
    for model_name in plan["models"]:
        for dtype_name in plan["dtypes"]:
            dtype, amp_dtype = _precision(dtype_name, plan["amp"])
            for preset in args.presets:
                providers = [pr for pr in plan["providers"] if (preset == "baseline") == (pr == "timm")]
                if not providers:
                    continue
                model = _build(model_name, preset, device, dtype, args.model_kwargs)
                for provider in providers:
                    label = provider_label(provider, "cudagraphs")
                    row = dict(model=model_name, dtype=dtype_name, preset=preset, provider=label, batch=1)
                    reason = skipped.get(provider_label(provider, "plain"))
                    if reason:
                        row["skipped"] = reason
                    else:
                        try:
                            row.update(latency_ms(model, provider, device, amp_dtype, args.latency_replays))
                            log(f"  latency {model_name} {dtype_name} {preset} {label}: {row['median_ms']:.3f} ms")
                        except Exception as exc:
                            if args.strict:
                                raise
                            row["error"] = _error_text(exc)
                    rows.append(row)
                del model
    return dict(rows=rows)


def metadata(args, device, plan) -> Dict:
    meta = common.run_metadata(device)
    meta.update(argv=list(getattr(args, "argv", [])), suite=args.suite, amp=plan["amp"],
                model_kwargs=args.model_kwargs, compile_backend=args.compile_backend if args.compile else None,
                timing=args.timing, max_spread=args.max_spread, method=METHOD_NOTE.format(repeats=args.repeats))
    if device.type == "cpu":
        import resource  # Linux/macOS; ru_maxrss is KiB on Linux

        meta["process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        meta["memory_note"] = CPU_PEAK_NOTE
    return meta


# ---------------------------------------------------------------------------
# output


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(rows: List[Dict], repeats: int) -> str:
    header = (f"{'model':<24} {'dtype':<5} {'preset':<9} {'provider':<16} {'GFLOPs':>6} {'img/s':>8} "
              f"{'range (min-max)':>17} {'speedup':>8} {'ideal':>6} {'ach/id':>6} {'peakMiB':>7}  note")
    lines = [header, "-" * len(header)]
    noisy = 0
    for r in rows:
        ips = r.get("images_per_s")
        if r.get("skipped") or r.get("error"):
            note = f"skipped: {r['skipped']}" if r.get("skipped") else f"error: {r['error']}"
        elif r.get("noisy"):
            noisy += 1
            note = "NOISY, not a result: " + "; ".join(r["noisy_reasons"])
        else:
            note = r["tokens"]
        rng = f"{r['ips_min']:.1f}-{r['ips_max']:.1f}" if ips else "-"
        mark = "?" if r.get("noisy") else ""  # a noisy row's ratios are shown, never as results
        lines.append(
            f"{r['model'][:24]:<24} {r['dtype']:<5} {r['preset']:<9} {r['provider']:<16} {r['gflops']:>6.2f} "
            f"{_fmt(ips, '8.1f'):>8} {rng:>17} {_fmt(r.get('speedup'), '.2f', 'x' + mark):>8} "
            f"{_fmt(r.get('ideal_speedup'), '.2f', 'x'):>6} {_fmt(r.get('achieved_over_ideal'), '.2f', mark):>6} "
            f"{_fmt(r.get('peak_mem_mb'), '7.0f'):>7}  {note}")
    lines.append(METHOD_NOTE.format(repeats=repeats))
    if noisy:
        lines.append(f"{noisy} row(s) NOISY (marked ?): rerun on an idle machine or with more --repeats / --seconds.")
    return "\n".join(lines)


def default_results_path(result: Dict, results_dir: str) -> str:
    meta = result["meta"]
    return os.path.join(results_dir, f"{common.slug(meta['device_name'])}-{meta['date']}.json")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    try:
        check_args(args)
        result = run_all(args)
    except UsageError as exc:
        parser.error(str(exc))
    print(format_table(result["rows"], args.repeats))
    path = args.json or (default_results_path(result, args.results_dir) if args.save else None)
    if path:
        common.write_json(path, dict(meta=result["meta"], **{k: v for k, v in result.items() if k != "meta"}))
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
