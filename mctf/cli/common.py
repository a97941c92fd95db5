"""What the command-line tools share, and the one home of how we measure throughput.

Importing this module imports neither torch nor timm: the tools build their parsers
from it and parse before anything heavy loads, so ``--help`` and usage errors are
instant. Functions that need torch or timm import them when called.

Contents: argument helpers (timm-style ``key=value`` model kwargs, MCTF options,
timing options, a help formatter that shows defaults), checks that turn bad input
into ``UsageError`` before heavy work, model building from a name and kwargs, GFLOPs
counting, device naming, timm's data config, result files, and the measurement
methodology (warmup until stable, interleaved timed repeats, median and spread,
noisy flags) described in bench/NOTES.md, "How we measure".
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

# the same names as mctf_kernels.BACKENDS (a test keeps them equal); repeated here so
# that building a parser does not import torch
BACKENDS = ("auto", "reference", "triton")
# Token Merging (mctf.ToMeConfig) at r tokens in every block: "tome-r<r>"
TOME_PRESETS = ("tome-r8", "tome-r13", "tome-r16")
PRESETS = ("mctf", "mctf-fast", "baseline") + TOME_PRESETS
DEFAULT_CROP_PCT = 0.875  # the public code's (DeiT's) eval crop ratio
BACKEND_ENV = "MCTF_BACKEND"


class UsageError(Exception):
    """Bad user input: the tool reports ``<tool>: error: <message>`` and exits with status 2."""


@contextlib.contextmanager
def cli_errors(parser: argparse.ArgumentParser):
    """Around a tool's checks and run: a ``UsageError``, or the Triton backend refusing
    to run (raised inside a forward, after the checks), becomes ``prog: error: ...`` with
    exit 2; a torchrun process group is torn down however the run ends."""
    try:
        yield
    except UsageError as exc:
        parser.error(str(exc))
    except Exception as exc:
        from mctf_kernels import BackendUnavailable

        if isinstance(exc, BackendUnavailable):
            parser.error(str(exc).splitlines()[0])
        raise
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# arguments (no torch)


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option whose help does not already say its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or unset or not action.option_strings:  # (0 is a default worth showing)
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        if isinstance(action.default, dict):
            default = " ".join(f"{k}={v}" for k, v in action.default.items()) or "none"
        return f"{text} (default: {default})"


def available_cpus() -> int:
    """CPUs this process may run on (what torch's DataLoader checks workers against)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers() -> int:
    """Data-loader workers: as many as the machine offers, at most 8, so torch never warns."""
    return min(8, available_cpus())


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as avg stays a string, as timm's train.py reads it


def parse_model_kwargs(items: Sequence[str]) -> Dict:
    """``--model-kwargs`` values: timm's ``key=value ...`` (values read as Python literals,
    else strings) or one JSON object (the first version's form)."""
    items = list(items or [])
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        try:
            value = json.loads(items[0])
        except json.JSONDecodeError as exc:
            raise UsageError(f"--model-kwargs is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise UsageError("--model-kwargs JSON must be an object, e.g. '{\"img_size\": 384}'")
        return value
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--model-kwargs: {item!r} is not key=value (e.g. img_size=384), nor a JSON object")
        kwargs[key] = _literal(value)
    return kwargs


def parse_number(text: str):
    """'16' -> 16, '0.35' -> 0.35, '1.0' -> 1 (integral values become ints)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return int(value) if value.is_integer() else value


def parse_r_values(texts: Sequence[str], option: str = "--r") -> List:
    """Token counts >= 0 or fractions in (0, 1)."""
    values = []
    for text in texts:
        try:
            value = parse_number(str(text))
        except ValueError:
            raise UsageError(f"{option}: {text!r} is not a number") from None
        if value < 0 or (isinstance(value, float) and value > 1):
            raise UsageError(f"{option}: {text!r} must be a token count >= 0 or a fraction in (0, 1)")
        values.append(value)
    return values


def add_model_kwargs_argument(p) -> None:
    p.add_argument("--model-kwargs", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model arguments, timm style (img_size=384 depth=6) or one JSON object "
                        "('{\"img_size\": 384}'); default: none")


def add_model_arguments(p, default_model: Optional[str]) -> None:
    """-m/--model, --pretrained, --checkpoint, --num-classes, --model-kwargs (mctf-eval, mctf-visualize)."""
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", default=default_model, required=default_model is None,
                   help="timm model name" + ("" if default_model else " (required)"))
    g.add_argument("--pretrained", action="store_true",
                   help="start from timm's pretrained weights (downloads them) instead of random init")
    g.add_argument("--checkpoint", help="weights to load: the public MCTF code's format ({'model': state_dict, ...}) "
                                        "or a plain state_dict; default: none (random init or --pretrained)")
    g.add_argument("--num-classes", type=int, help="classifier outputs; default: the model's (1000)")
    add_model_kwargs_argument(g)


def add_config_arguments(p, r_help: str) -> None:
    """The MCTF options of ``mctf-eval`` and ``mctf-visualize``."""
    g = p.add_argument_group("MCTF configuration")
    g.add_argument("--preset", choices=PRESETS, default=None,
                   help="mctf: r=16 on blocks 1..depth-1; mctf-fast: r=0.35 on every (depth//4)-th block; "
                        "baseline: the unpatched timm model; tome-r<N>: Token Merging, r=N in every block; "
                        "default: mctf")
    g.add_argument("--mctf-type", nargs="+", metavar="V",
                   help="the public code's --mctf_type list, 11 numbers (r r_teacher_max trace_source prop_attn "
                        "one_step_ahead tau_sim tau_info tau_size bidirection pooling_type 0); replaces --preset; "
                        "default: none")
    g.add_argument("--activate-layer", nargs="+", type=int, metavar="I",
                   help="0-based blocks where fusion runs (the public code's --activate_layer); default: the "
                        "preset's blocks, or every block with --mctf-type")
    g.add_argument("--r", "--r-evals", "--r_evals", dest="r", nargs="+", metavar="R", help=r_help)
    g.add_argument("--backend", choices=BACKENDS,
                   help=f"mctf_kernels backend; default: ${BACKEND_ENV}, else auto (Triton on CUDA, the eager "
                        f"reference otherwise)")


def add_timing_arguments(p, repeats: int = 5, seconds: float = 0.5, warmup: int = 3,
                         warmup_seconds: float = 1.0) -> None:
    """How throughput is measured (bench/NOTES.md, "How we measure")."""
    g = p.add_argument_group("timing (bench/NOTES.md, 'How we measure')")
    g.add_argument("--warmup", type=int, default=warmup,
                   help="warmup: at least this many forward passes per row, and until the last three agree "
                        "within 5%%")
    g.add_argument("--warmup-seconds", type=float, default=warmup_seconds,
                   help="warmup: at least this many seconds per row")
    g.add_argument("--warmup-max-seconds", type=float, default=10.0,
                   help="warmup gives up after this many seconds and flags the row noisy")
    g.add_argument("--repeats", type=int, default=repeats,
                   help="timed repeats per row, rows interleaved (A B A B ...); the median is reported")
    g.add_argument("--seconds", type=float, default=seconds,
                   help="at least this many seconds per timed repeat (the iteration count per repeat is "
                        "fixed from the warmup)")
    g.add_argument("--max-iters", type=int, default=1000, help="at most this many forward passes per repeat")
    g.add_argument("--max-spread", type=float, default=0.10,
                   help="flag a row noisy when (max - min) / median of its repeats' images/s exceeds this")


def timing_options(args) -> Dict:
    if args.repeats < 1:
        raise UsageError("--repeats must be >= 1")
    if args.max_iters < 1:
        raise UsageError("--max-iters must be >= 1")
    for name in ("warmup", "warmup_seconds", "warmup_max_seconds", "seconds", "max_spread"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
    return dict(repeats=args.repeats, repeat_seconds=args.seconds, max_iters=args.max_iters,
                warmup_iters=args.warmup, warmup_seconds=args.warmup_seconds,
                warmup_max_seconds=args.warmup_max_seconds)


def backend_from_env() -> Optional[str]:
    """``$MCTF_BACKEND`` checked the way mctf_kernels reads it; None when unset."""
    raw = os.environ.get(BACKEND_ENV)
    if raw is None or not raw.strip():
        return None
    name = raw.strip().lower()
    if name not in BACKENDS:
        raise UsageError(f"{BACKEND_ENV}={raw!r} is not a backend (choose {', '.join(BACKENDS)})")
    return name


# ---------------------------------------------------------------------------
# devices and versions


def version(dist: str) -> Optional[str]:
    try:  # metadata only: reading triton's version must not import it
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def resolve_device(arg: str, local_rank: int = 0):
    """``auto`` -> cuda:<local_rank> if CUDA is available, else cpu; anything else is checked."""
    import torch

    if arg == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(arg)
    except RuntimeError as exc:
        raise UsageError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {arg}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {arg}: only cpu and cuda are supported")
    return device


def device_name(device) -> str:
    import torch

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


def check_triton_backend(backend: Optional[str], device) -> None:
    """``--backend triton`` (or ``$MCTF_BACKEND=triton``) where the kernels cannot run is a usage error."""
    if backend != "triton":
        return
    from mctf_kernels import dispatch

    reason = dispatch.triton_unavailable_reason("match", device, "triton")
    if reason:
        raise UsageError(f"backend triton cannot run on {device}: {reason}; use --backend auto or reference")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ---------------------------------------------------------------------------
# models


def check_model_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"unknown timm model {name!r}{hint}")


def create_model(name: str, kwargs: Optional[Dict] = None, num_classes: Optional[int] = None,
                 pretrained: bool = False, checkpoint: Optional[str] = None, device=None):
    """A timm model in eval mode (random init unless ``pretrained``), ``checkpoint`` loaded strictly.
    ``device="meta"`` builds the structure only (no memory, no init): the cheap check of a name
    and its kwargs before any heavy work."""
    import timm
    import torch

    import mctf

    check_model_name(name)
    kwargs = dict(kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        if device is not None and str(device) == "meta":
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, **kwargs)
        else:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise UsageError(f"cannot create {name} with --model-kwargs {kwargs}: {exc}") from None
    if checkpoint and str(device) != "meta":
        if not os.path.isfile(checkpoint):
            raise UsageError(f"--checkpoint: no such file: {checkpoint}")
        try:
            mctf.load_checkpoint(model, checkpoint)
        except mctf.CheckpointMismatchError as exc:
            raise UsageError(str(exc)) from None
        except Exception as exc:  # not a torch file, truncated ...
            raise UsageError(f"--checkpoint: cannot read {checkpoint}: {exc}") from None
    return model.eval()


def patch_model(model, config):
    """``mctf.patch.timm`` with its refusals (unsupported model, bad layers) as usage errors."""
    import mctf

    if config is None:
        return model
    try:
        return mctf.patch.timm(model, config)
    except (mctf.UnsupportedModelError, ValueError) as exc:
        raise UsageError(f"{exc}") from None


def build_config(args, depth: int):
    """The MCTF configuration that --preset / --mctf-type / --activate-layer ask for; None for the
    unpatched baseline."""
    import mctf

    if args.mctf_type is not None:
        if args.preset is not None:
            raise UsageError("give either --preset or --mctf-type, not both")
        try:
            values = [parse_number(v) for v in args.mctf_type]
            config = mctf.MCTFConfig.from_mctf_type(values, activate_layer=args.activate_layer)
        except ValueError as exc:
            raise UsageError(f"--mctf-type: {exc}") from None
    elif args.preset in TOME_PRESETS:
        if args.activate_layer is not None:
            raise UsageError("ToMe presets merge in every block: --activate-layer is an MCTF option")
        if args.r is not None:
            bad = [v for v in parse_r_values(args.r) if not isinstance(v, int)]
            if bad:
                raise UsageError(f"--r: ToMe merges a whole number of tokens per block, got {bad}")
        return preset_config(args.preset, depth)
    elif args.preset == "baseline":
        if args.r is not None or args.activate_layer is not None:
            raise UsageError("--preset baseline runs the unpatched model: it takes no --r or --activate-layer "
                             "(use --r 0 with an MCTF preset for the patched model with no fusion)")
        return None
    else:
        config = mctf.MCTFConfig.preset(args.preset or "mctf", depth=depth)
        if args.activate_layer is not None:
            try:
                config = config.replace(layers=tuple(args.activate_layer))
            except ValueError as exc:
                raise UsageError(f"--activate-layer: {exc}") from None
    try:
        config.active_layers(depth)
    except ValueError as exc:
        raise UsageError(f"--activate-layer: {exc}") from None
    return config


def preset_config(preset: str, depth: int, **overrides):
    import mctf

    if preset in TOME_PRESETS:
        return mctf.ToMeConfig(r=int(preset[len("tome-r"):]), **overrides)
    return None if preset == "baseline" else mctf.MCTFConfig.preset(preset, depth=depth, **overrides)


def describe_config(config) -> str:
    """One line for logs: the MCTF list and blocks, or the ToMe settings."""
    import mctf

    if config is None:
        return "baseline (unpatched)"
    if isinstance(config, mctf.ToMeConfig):
        return (f"tome r={config.r} inflection={config.inflection} prop_attn={config.prop_attn} "
                f"(every block)")
    layers = list(config.layers) if config.layers is not None else "all"
    return f"mctf_type={config.to_mctf_type()} layers={layers}"


def mctf_type_of(config):
    """The public MCTF code's list for an MCTF config; None for ToMe or the baseline."""
    import mctf

    return config.to_mctf_type() if isinstance(config, mctf.MCTFConfig) else None


def check_supported(name: str, kwargs: Dict, config_for: Callable) -> None:
    """Build ``name`` on the meta device and patch it: an unknown name, bad kwargs or a model MCTF
    does not support is a usage error before any weights exist. ``config_for(depth)`` gives the
    configuration (None: the unpatched baseline only, nothing to check)."""
    model = create_model(name, kwargs, device="meta")
    if not hasattr(model, "blocks"):
        # mctf.patch.timm names the exact reason (e.g. not a VisionTransformer)
        import mctf

        try:
            mctf.patch.timm(model, mctf.MCTFConfig())
        except mctf.UnsupportedModelError as exc:
            raise UsageError(f"{name}: {exc}") from None
        raise UsageError(f"{name}: not a ViT with blocks")
    config = config_for(len(model.blocks))
    if config is not None:
        try:
            patch_model(model, config)
        except UsageError as exc:
            raise UsageError(f"{name}: {exc}") from None


def input_size(model) -> tuple:
    embed = getattr(model, "patch_embed", None)
    img_size = getattr(embed, "img_size", None)
    if img_size is not None:  # follows img_size overrides in --model-kwargs
        return (embed.proj.in_channels, *img_size)
    return tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))


def num_tokens(model) -> int:
    return model.patch_embed.num_patches + model.num_prefix_tokens


def planned_tokens(model) -> List[int]:
    """Tokens after every block (known before any data: static shapes)."""
    if not hasattr(model, "mctf_state"):
        return [num_tokens(model)] * len(model.blocks)
    return list(model.mctf_state.planned_tokens(num_tokens(model)))


def gflops_per_image(model, images) -> float:
    """Multiply-accumulates per image (the usual "FLOPs" of ViT papers), by torch.utils.flop_counter."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import mctf

    # the math backend decomposes attention into matmuls the counter sees on every
    # device (fused CPU attention kernels are not counted); the reference backend
    # because Triton kernels are invisible to the counter (same math either way)
    with torch.no_grad(), mctf.use_backend("reference"), sdpa_kernel(SDPBackend.MATH), \
            FlopCounterMode(display=False) as counter:
        model(images[:1])
    return counter.get_total_flops() / 1e9 / 2


def data_config_for(model, crop_pct: Optional[float] = None) -> Dict:
    """timm's data config for ``model`` at its own input size (img_size overrides included)."""
    from timm.data import resolve_data_config

    args = {"crop_pct": crop_pct or DEFAULT_CROP_PCT}
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        args["input_size"] = (3, *img_size)
    return resolve_data_config(args, model=model)


# ---------------------------------------------------------------------------
# result files


def check_output_path(path: Optional[str], option: str = "--output") -> None:
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UsageError(f"{option}: directory of {path} does not exist")


def write_json(path: str, payload: Dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def run_metadata(device) -> Dict:
    """Device, versions and machine state that every result file carries."""
    import datetime

    import torch

    import mctf

    now = datetime.datetime.now()
    meta = dict(
        device=str(device), device_type=device.type, device_name=device_name(device),
        torch=torch.__version__, triton=version("triton"), timm=version("timm"), mctf=mctf.__version__,
        cuda=torch.version.cuda if device.type == "cuda" else None,
        python=platform.python_version(), platform=platform.platform(),
        date=now.strftime("%Y-%m-%d"), datetime=now.isoformat(timespec="seconds"),
        threads=torch.get_num_threads(),
    )
    if hasattr(os, "getloadavg"):  # a shared machine's timings are only as good as its load
        meta["load_average_1_5_15"] = list(os.getloadavg())
    return meta


# ---------------------------------------------------------------------------
# how we measure (bench/NOTES.md, "How we measure")


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed(step: Callable[[], object], iters: int, device) -> float:
    """Seconds for ``iters`` back-to-back calls of ``step``: CUDA events on the GPU (device
    time, no host overhead between launches counted twice), perf_counter on the CPU."""
    if device.type == "cuda":
        import torch

        _sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return time.perf_counter() - start


def settled(times: Sequence[float], tol: float) -> bool:
    """The samples agree within ``tol`` of their median."""
    med = statistics.median(times)
    return med > 0 and (max(times) - min(times)) / med <= tol


def warmup(step: Callable[[], object], device, min_iters: int, min_seconds: float, max_seconds: float,
           window: int = 3, tol: float = 0.05, clock: Callable[[], float] = time.perf_counter,
           timer: Optional[Callable] = None) -> Dict:
    """Run ``step`` until at least ``min_iters`` passes and ``min_seconds`` have gone by and the
    last ``window`` passes agree within ``tol``; give up (``stable=False``) after ``max_seconds``.
    Returns iters, seconds, stable (None when no warmup was asked for) and the settled seconds
    per pass (None when nothing ran)."""
    timer = timer or timed
    if min_iters <= 0 and min_seconds <= 0:
        return dict(iters=0, seconds=0.0, stable=None, iter_seconds=None)
    times: List[float] = []
    start = clock()
    while True:
        times.append(timer(step, 1, device))
        elapsed = clock() - start
        enough = len(times) >= max(min_iters, window) and elapsed >= min_seconds
        if enough and settled(times[-window:], tol):
            stable = True
            break
        if elapsed >= max_seconds:
            stable = False
            break
    return dict(iters=len(times), seconds=elapsed, stable=stable, iter_seconds=statistics.median(times[-window:]))


def interleaved_order(labels: Sequence[str], repeats: int) -> List[tuple]:
    """(repeat, label) in the order the timed repeats run: A B C A B C ..., so a slow drift of the
    machine (clocks, other load) touches every row alike and cancels in their ratios."""
    return [(i, label) for i in range(repeats) for label in labels]


def measure_interleaved(steps: Dict[str, Callable[[], object]], device, repeats: int, repeat_seconds: float,
                        max_iters: int, warmup_iters: int, warmup_seconds: float, warmup_max_seconds: float,
                        setups: Optional[Dict[str, Callable[[], None]]] = None,
                        timer: Optional[Callable] = None) -> Dict[str, Dict]:
    """Warm up every step, then run the timed repeats interleaved. ``setups[label]`` (untimed)
    runs before each of that label's warmup and repeats (e.g. re-patching a shared model).
    Returns label -> dict(iters_per_repeat, seconds_per_iter=[per repeat], warmup=...)."""
    timer = timer or timed
    setups = setups or {}
    out: Dict[str, Dict] = {}
    for label, step in steps.items():
        setups.get(label, lambda: None)()
        w = warmup(step, device, warmup_iters, warmup_seconds, warmup_max_seconds, timer=timer)
        per = w["iter_seconds"]
        iters = 1 if not per else max(1, min(max_iters, math.ceil(repeat_seconds / per)))
        out[label] = dict(iters_per_repeat=iters, seconds_per_iter=[], warmup=w)
    for _, label in interleaved_order(list(steps), repeats):
        setups.get(label, lambda: None)()
        iters = out[label]["iters_per_repeat"]
        out[label]["seconds_per_iter"].append(timer(steps[label], iters, device) / iters)
    return out


def summarize(seconds_per_iter: Sequence[float], batch: int) -> Dict:
    """images/s of the repeats: median, min, max, quartiles, and spread = (max - min) / median."""
    ips = sorted(batch / s for s in seconds_per_iter if s > 0)
    if not ips:
        return dict(images_per_s=None, ips_min=None, ips_max=None, ips_q1=None, ips_q3=None, spread=None,
                    repeats=0)
    med = statistics.median(ips)
    q1, q3 = (statistics.quantiles(ips, n=4, method="inclusive")[::2] if len(ips) > 1 else (ips[0], ips[0]))
    return dict(images_per_s=med, ips_min=ips[0], ips_max=ips[-1], ips_q1=q1, ips_q3=q3,
                spread=(ips[-1] - ips[0]) / med, repeats=len(ips))


def paired_ratio(num_seconds: Sequence[float], den_seconds: Sequence[float]) -> Dict:
    """Speedup of row A over row B from interleaved repeats: the ratio of each round (A's
    images/s over B's, measured side by side), then median, min and max over the rounds."""
    ratios = sorted(d / n for n, d in zip(num_seconds, den_seconds) if n > 0 and d > 0)
    if not ratios:
        return dict(ratio=None, ratio_min=None, ratio_max=None)
    return dict(ratio=statistics.median(ratios), ratio_min=ratios[0], ratio_max=ratios[-1])


def noisy_reasons(spread: Optional[float], max_spread: float, achieved_over_ideal: Optional[float] = None,
                  warmup_stable: Optional[bool] = True, repeats: int = 2) -> List[str]:
    """Why a row is not a result (empty: it is one). A wide spread says the machine moved under
    the measurement; a speedup above the FLOP ideal (x1.05) says something other than the
    fusion was measured; an unsettled warmup or a single repeat leaves the median unfounded."""
    reasons = []
    if spread is not None and spread > max_spread:
        reasons.append(f"spread {100 * spread:.0f}% > {100 * max_spread:.0f}%")
    if achieved_over_ideal is not None and achieved_over_ideal > 1.05:
        reasons.append(f"achieved/ideal {achieved_over_ideal:.2f} > 1.05")
    if warmup_stable is False:
        reasons.append("warmup did not settle")
    elif warmup_stable is None:
        reasons.append("no warmup")
    if repeats < 2:
        reasons.append("one repeat")
    return reasons
