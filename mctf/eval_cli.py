"""``mctf-eval``: ImageNet-style evaluation of an MCTF-patched timm ViT.

One pass over an ImageFolder (the ImageNet val layout, ``<root>/<class>/<image>``)
per ``--r`` value, printing top-1, top-5, loss, images/s and GFLOPs per image.
The data pipeline is timm's (``resolve_data_config`` / ``create_transform``):
resize to ``size / crop_pct`` and center-crop, with the model's interpolation and
mean/std; ``crop_pct`` defaults to 0.875, the public MCTF (DeiT) evaluation.

Under ``torchrun`` (WORLD_SIZE > 1) every rank evaluates a disjoint shard of the
images (no padding duplicates) and the counts are summed across ranks; rank 0
prints and writes the results.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import os
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import mctf
from mctf.bench_cli import gflops_per_image

PRESETS = ("mctf", "mctf-fast", "baseline")
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_CROP_PCT = 0.875  # the public code's (DeiT's) --eval-crop-ratio


class UsageError(Exception):
    """Bad user input: reported as ``mctf-eval: error: ...`` with exit status 2."""


# ---------------------------------------------------------------------------
# arguments


def parse_number(text: str):
    """'16' -> 16, '0.35' -> 0.35, '1.0' -> 1 (integral values become ints)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return int(value) if value.is_integer() else value


def parse_r_values(texts: Sequence[str]) -> List:
    """Validate ``--r`` values: integers >= 0 (token counts) or fractions in (0, 1)."""
    values = []
    for text in texts:
        try:
            value = parse_number(text)
        except ValueError:
            raise UsageError(f"--r: {text!r} is not a number") from None
        if value < 0 or (isinstance(value, float) and value > 1):
            raise UsageError(f"--r: {text!r} must be a token count >= 0 or a fraction in (0, 1)")
        values.append(value)
    return values


def add_config_arguments(p: argparse.ArgumentParser, r_help: str) -> None:
    """The MCTF options shared by ``mctf-eval`` and ``mctf-visualize``."""
    g = p.add_argument_group("MCTF configuration")
    g.add_argument("--preset", choices=PRESETS, default=None,
                   help="mctf: r=16 on blocks 1..depth-1 (default); mctf-fast: r=0.35 on every (depth//4)-th "
                        "block; baseline: the unpatched timm model")
    g.add_argument("--mctf-type", nargs="+", metavar="V",
                   help="the public code's --mctf_type list (11 numbers: r r_teacher_max trace_source prop_attn "
                        "one_step_ahead tau_sim tau_info tau_size bidirection pooling_type 0); replaces --preset")
    g.add_argument("--activate-layer", nargs="+", type=int, metavar="I",
                   help="0-based blocks where fusion runs (the public code's --activate_layer); default: the "
                        "preset's blocks, or every block with --mctf-type")
    g.add_argument("--r", "--r-evals", "--r_evals", dest="r", nargs="+", metavar="R", help=r_help)
    g.add_argument("--backend", choices=mctf.BACKENDS, help="mctf_kernels backend (default $MCTF_BACKEND or auto)")


def add_model_arguments(p: argparse.ArgumentParser, default_model: Optional[str]) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default_model, required=default_model is None, help="timm model name")
    g.add_argument("--checkpoint", help="weights: the public code's format ({'model': state_dict, ...}) or a "
                                        "plain state_dict; default: random init")
    g.add_argument("--num-classes", type=int, help="classifier outputs (default: timm's, 1000)")
    g.add_argument("--model-kwargs", default="{}", metavar="JSON",
                   help='extra timm.create_model arguments, e.g. \'{"img_size": 384}\'')


def build_config(args, depth: int) -> Optional[mctf.MCTFConfig]:
    """The MCTF configuration the options ask for; None for the unpatched baseline."""
    if args.mctf_type is not None:
        if args.preset is not None:
            raise UsageError("give either --preset or --mctf-type, not both")
        try:
            values = [parse_number(v) for v in args.mctf_type]
            config = mctf.MCTFConfig.from_mctf_type(values, activate_layer=args.activate_layer)
        except ValueError as exc:
            raise UsageError(f"--mctf-type: {exc}") from None
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


def create_model(args, num_classes: Optional[int] = None):
    """A random-init timm model (checked against the registry), with the checkpoint loaded."""
    import timm

    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--model-kwargs is not valid JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise UsageError("--model-kwargs must be a JSON object, e.g. '{\"img_size\": 384}'")
    if not timm.is_model(args.model):
        close = difflib.get_close_matches(args.model, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"unknown timm model {args.model!r}{hint}")
    num_classes = args.num_classes if getattr(args, "num_classes", None) is not None else num_classes
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(args.model, pretrained=False, **kwargs)
    except TypeError as exc:
        raise UsageError(f"cannot create {args.model} with --model-kwargs {kwargs}: {exc}") from None
    if args.checkpoint:
        if not os.path.isfile(args.checkpoint):
            raise UsageError(f"--checkpoint: no such file: {args.checkpoint}")
        try:
            mctf.load_checkpoint(model, args.checkpoint)
        except mctf.CheckpointMismatchError as exc:
            raise UsageError(str(exc)) from None
        except Exception as exc:  # not a torch file, truncated ...
            raise UsageError(f"--checkpoint: cannot read {args.checkpoint}: {exc}") from None
    return model.eval()


def patch_model(model, config: Optional[mctf.MCTFConfig]):
    if config is None:
        return model
    try:
        return mctf.patch.timm(model, config)
    except (mctf.UnsupportedModelError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def data_config_for(model, crop_pct: Optional[float] = None) -> Dict:
    """timm's data config for ``model`` at the model's own input size (img_size overrides included)."""
    from timm.data import resolve_data_config

    args = {"crop_pct": crop_pct or DEFAULT_CROP_PCT}
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        args["input_size"] = (3, *img_size)
    return resolve_data_config(args, model=model)


# ---------------------------------------------------------------------------
# data


class ShardSampler(torch.utils.data.Sampler):
    """Indices ``rank, rank + world, ...``: disjoint shards covering every image exactly once."""

    def __init__(self, num_samples: int, rank: int, world_size: int):
        self.indices = range(rank, num_samples, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_dataset(path: str, transform):
    """torchvision's ImageFolder, with clear errors for a wrong path or a folder with no images."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not os.path.exists(path):
        raise UsageError(f"--data-path: no such directory: {path}")
    if not os.path.isdir(path):
        raise UsageError(f"--data-path: not a directory: {path}")
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir())
    if not classes:
        raise UsageError(f"--data-path: no class folders in {path} (expected the ImageFolder layout "
                         f"{path}/<class>/<image>, as ImageNet val)")
    try:
        dataset = ImageFolder(path, transform=transform)
    except FileNotFoundError:  # class folders hold no image files
        raise UsageError(f"--data-path: no images found under {path} ({len(classes)} class folders, e.g. "
                         f"{classes[0]!r}; extensions {', '.join(IMG_EXTENSIONS)})") from None
    return dataset


# ---------------------------------------------------------------------------
# distributed


def init_distributed(device_arg: str = "auto"):
    """(rank, world_size, local_rank); starts the process group when WORLD_SIZE > 1
    (NCCL when the ranks run on CUDA, Gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def all_reduce(values: List[float], device: torch.device, world: int, op: str = "sum") -> List[float]:
    if world <= 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


# ---------------------------------------------------------------------------
# evaluation


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(model, loader, device: torch.device, amp_dtype: Optional[torch.dtype], topk: int,
             progress: bool = False, desc: str = "") -> Dict[str, float]:
    """Sums over this process's images: correct top-1/top-k, loss, count, forward seconds."""
    correct1 = correctk = loss_sum = count = 0.0
    seconds = 0.0
    autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(loader), desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True)
    with torch.no_grad():
        for images, target in loader:
            images = images.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            _sync(device)
            start = time.perf_counter()
            with autocast:
                logits = model(images)
            _sync(device)
            seconds += time.perf_counter() - start
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            top = logits.topk(topk, dim=1).indices
            hits = top.eq(target[:, None])
            correct1 += hits[:, 0].sum().item()
            correctk += hits.any(dim=1).sum().item()
            count += images.shape[0]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(top1=f"{100 * correct1 / count:.2f}")
    if bar is not None:
        bar.close()
    return dict(correct1=correct1, correctk=correctk, loss_sum=loss_sum, count=count, seconds=seconds)


def format_table(results: List[Dict], topk: int) -> str:
    header = (f"{'r':>6} {'top-1':>7} {f'top-{topk}':>7} {'loss':>8} {'img/s':>9} {'GFLOPs':>8}  "
              f"tokens after each block")
    lines = [header, "-" * len(header)]
    for row in results:
        r = "-" if row["r"] is None else str(row["r"])
        tokens = ",".join(str(t) for t in row["tokens_per_block"])
        lines.append(f"{r:>6} {row['top1']:>7.2f} {row['top5']:>7.2f} {row['loss']:>8.4f} "
                     f"{row['images_per_s']:>9.1f} {row['gflops']:>8.3f}  {tokens}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mctf-eval", description=__doc__.split("\n\n")[0],
                                epilog="Multi-GPU: torchrun --nproc_per_node N -m mctf.eval_cli ... (write --r-evals there: "
                                       "torchrun's own parser takes --r for an abbreviation)")
    add_model_arguments(p, default_model=None)
    add_config_arguments(p, r_help="one evaluation pass per value, replacing the config's r on its active "
                                   "blocks (the public code's --r_evals); 0 = no fusion")
    g = p.add_argument_group("data and run")
    g.add_argument("--data-path", required=True, help="ImageFolder root (<root>/<class>/<image>), e.g. ImageNet val")
    g.add_argument("--crop-pct", type=float, help=f"center-crop ratio (default {DEFAULT_CROP_PCT})")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--workers", type=int, default=4, help="data loader worker processes")
    g.add_argument("--amp", choices=sorted(AMP_DTYPES), help="autocast dtype (default: fp32)")
    g.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda ...")
    g.add_argument("--output", help="write the results to this JSON file")
    g.add_argument("--seed", type=int, default=0, help="seed of a random-init model (the same on every rank)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args) -> Tuple[Dict, bool]:
    """Evaluate; returns (the report, whether this is rank 0) on every rank, or raises UsageError."""
    import timm

    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if args.workers < 0:
        raise UsageError("--workers must be >= 0")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise UsageError("--crop-pct must be in (0, 1]")
    r_values = parse_r_values(args.r) if args.r is not None else None
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise UsageError(f"--output: directory of {args.output} does not exist")
    if not os.path.isdir(args.data_path):  # before building a model: fail fast on the common typo
        build_dataset(args.data_path, None)

    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            raise UsageError(f"--device: {exc}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available")
    rank, world, local_rank = init_distributed(args.device)
    main_rank = rank == 0
    if args.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    elif device.type == "cuda" and device.index is None and world > 1:
        device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.backend:
        mctf.set_backend(args.backend)
    amp_dtype = AMP_DTYPES.get(args.amp) if args.amp else None

    torch.manual_seed(args.seed)
    model = create_model(args)
    depth = len(getattr(model, "blocks", ()))
    config = build_config(args, depth)
    model = patch_model(model, config).to(device)

    data_config = data_config_for(model, args.crop_pct)
    from timm.data import create_transform

    dataset = build_dataset(args.data_path, create_transform(**data_config, is_training=False))
    num_classes = model.num_classes
    if len(dataset.classes) > num_classes:
        raise UsageError(f"{args.data_path} has {len(dataset.classes)} classes but the model has {num_classes} "
                         f"outputs (set --num-classes)")
    if len(dataset.classes) != num_classes and main_rank:
        _log(f"mctf-eval: warning: {len(dataset.classes)} class folders for a {num_classes}-class model; "
             f"folder i (sorted by name) is scored as class i")
    topk = min(5, num_classes)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=ShardSampler(len(dataset), rank, world),
        num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=False,
    )
    if main_rank:
        cfg_text = "baseline (unpatched)" if config is None else f"mctf_type={config.to_mctf_type()} layers={list(config.layers) if config.layers is not None else 'all'}"
        _log(f"mctf-eval: {args.model} on {device} x{world}, {len(dataset)} images in {len(dataset.classes)} "
             f"classes, amp={args.amp or 'off'}, backend={mctf.get_backend()}, {cfg_text}")
        _log(f"mctf-eval: data {data_config}")

    passes = [None] if config is None else (r_values if r_values is not None else [config.r])
    num_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    probe = torch.zeros(1, *data_config["input_size"], device=device)
    results = []
    for r in passes:
        if config is not None:
            model = patch_model(model, config.replace(r=r))
            tokens = model.mctf_state.planned_tokens(num_tokens)
        else:
            tokens = [num_tokens] * depth
        gflops = gflops_per_image(model, probe)
        sums = evaluate(model, loader, device, amp_dtype, topk, progress=main_rank and not args.no_progress,
                        desc=f"r={r}" if r is not None else "baseline")
        correct1, correctk, loss_sum, count = all_reduce(
            [sums["correct1"], sums["correctk"], sums["loss_sum"], sums["count"]], device, world)
        (seconds,) = all_reduce([sums["seconds"]], device, world, op="max")
        results.append(dict(
            r=r, mctf_type=None if config is None else config.replace(r=r).to_mctf_type(), top1=100.0 * correct1 / count, top5=100.0 * correctk / count, loss=loss_sum / count,
            images_per_s=count / seconds if seconds > 0 else float("nan"), gflops=gflops,
            tokens_per_block=tokens, num_images=int(count), correct1=int(correct1), correct5=int(correctk),
            forward_seconds=seconds,
        ))
    return dict(
        model=args.model, checkpoint=args.checkpoint, data_path=os.path.abspath(args.data_path),
        num_images=len(dataset), num_classes=num_classes, dataset_classes=len(dataset.classes), topk=topk,
        data_config={k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        mctf_type=None if config is None else config.to_mctf_type(),
        activate_layer=None if config is None or config.layers is None else list(config.layers),
        amp=args.amp, device=str(device), world_size=world, batch_size=args.batch_size,
        backend=mctf.get_backend(), results=results, torch=torch.__version__, timm=timm.__version__,
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    ), main_rank


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report, main_rank = run(args)
    except UsageError as exc:
        parser.error(str(exc))
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if main_rank:
        print(format_table(report["results"], report["topk"]))
        if args.output:
            with open(args.output, "w") as f:
                json.dump(report, f, indent=2)
            _log(f"mctf-eval: wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
