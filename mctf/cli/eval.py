"""mctf-eval: ImageNet-style evaluation of an MCTF-patched timm ViT.

One accuracy pass over an ImageFolder (the ImageNet val layout, <root>/<class>/<image>)
per --r value, printing top-1, top-5, loss, GFLOPs per image and images/s. The data
pipeline is timm's (resolve_data_config / create_transform): resize to size / crop_pct
and center-crop, with the model's interpolation and mean/std; crop_pct defaults to
0.875, the public MCTF (DeiT) evaluation.

images/s is measured apart from the accuracy passes, as mctf-bench measures: forward
passes only on one batch of the folder's images held on the device (data loading
excluded), warmup until stable, interleaved timed repeats of every --r value, the
median with its min-max range (bench/NOTES.md, "How we measure").

Under torchrun (WORLD_SIZE > 1) every rank evaluates a disjoint shard of the images
(no padding duplicates) and the counts are summed across ranks; rank 0 prints and
writes the results.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

from mctf.cli import common
from mctf.cli.common import UsageError, cli_errors, log

AMP_DTYPES = ("fp16", "bf16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mctf-eval", description=__doc__.split("\n\n")[0], formatter_class=common.HelpFormatter,
        epilog="Several GPUs: torchrun --nproc_per_node N -m mctf.cli.eval ... (write --r-evals there: "
               "torchrun's own parser takes --r as an abbreviation of one of its options)")
    common.add_model_arguments(p, default_model=None)
    common.add_config_arguments(p, r_help="one evaluation pass per value, replacing the config's r on its active "
                                          "blocks (the public code's --r_evals); 0 = no fusion; default: the "
                                          "config's r")
    g = p.add_argument_group("data and run")
    g.add_argument("--data-path", required=True,
                   help="ImageFolder root (<root>/<class>/<image>), e.g. ImageNet val (required)")
    g.add_argument("--crop-pct", type=float, help=f"center-crop ratio; default: {common.DEFAULT_CROP_PCT}")
    g.add_argument("-b", "--batch-size", type=int, default=128, help="images per forward pass")
    g.add_argument("-j", "--workers", type=int, default=common.default_workers(),
                   help="data loader worker processes (min(8, CPUs available))")
    g.add_argument("--amp", choices=AMP_DTYPES, help="autocast dtype; default: none (fp32)")
    g.add_argument("--compile", action="store_true", help="run the model through torch.compile")
    g.add_argument("--compile-backend", default="inductor", help="torch.compile backend (with --compile)")
    g.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda ...")
    g.add_argument("--output", help="write the results to this JSON file; default: none")
    g.add_argument("--seed", type=int, default=0, help="seed of a random-init model (the same on every rank)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-timing", action="store_true", help="skip the images/s measurement (accuracy only)")
    common.add_timing_arguments(p, repeats=5, seconds=0.5, warmup=3, warmup_seconds=1.0)
    return p


def check_args(args) -> Dict:
    """Everything that needs neither torch nor timm; returns the parsed pieces."""
    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if args.workers < 0:
        raise UsageError("--workers must be >= 0")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise UsageError("--crop-pct must be in (0, 1]")
    common.check_output_path(args.output)
    if not os.path.isdir(args.data_path):  # before anything heavy: the common typo
        check_folder(args.data_path)
    return dict(r_values=common.parse_r_values(args.r) if args.r is not None else None,
                model_kwargs=common.parse_model_kwargs(args.model_kwargs),
                backend=args.backend or common.backend_from_env(), timing=common.timing_options(args))


# ---------------------------------------------------------------------------
# data


def check_folder(path: str) -> List[str]:
    """The class folders of an ImageFolder root, or a UsageError saying what is wrong."""
    if not os.path.exists(path):
        raise UsageError(f"--data-path: no such directory: {path}")
    if not os.path.isdir(path):
        raise UsageError(f"--data-path: not a directory: {path}")
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir())
    if not classes:
        raise UsageError(f"--data-path: no class folders in {path} (expected the ImageFolder layout "
                         f"{path}/<class>/<image>, as ImageNet val)")
    return classes


def build_dataset(path: str, transform):
    """torchvision's ImageFolder, with clear errors for a wrong path or a folder with no images."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = check_folder(path)
    try:
        return ImageFolder(path, transform=transform)
    except FileNotFoundError:  # class folders hold no image files
        raise UsageError(f"--data-path: no images found under {path} ({len(classes)} class folders, e.g. "
                         f"{classes[0]!r}; extensions {', '.join(IMG_EXTENSIONS)})") from None


def shard_sampler(num_samples: int, rank: int, world_size: int):
    """Indices rank, rank + world, ...: disjoint shards covering every image exactly once."""
    return range(rank, num_samples, world_size)


# ---------------------------------------------------------------------------
# distributed


def init_distributed(device_arg: str = "auto"):
    """(rank, world_size, local_rank); starts the process group when WORLD_SIZE > 1
    (NCCL when the ranks run on CUDA, Gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def start_rank(device, device_arg: str, backend: Optional[str]):
    """Start this process's rank (``init_distributed``) and place it: ``device`` (None for
    ``--device auto``) becomes this rank's device (cuda:LOCAL_RANK under torchrun when no
    index was given), the Triton backend is checked there and ``backend`` set.
    Returns (device, rank, world_size, local_rank)."""
    import torch

    import mctf

    rank, world, local_rank = init_distributed(device_arg)
    if device is None:
        device = common.resolve_device("auto", local_rank)
    elif device.type == "cuda" and device.index is None and world > 1:
        device = torch.device(f"cuda:{local_rank}")
    common.check_triton_backend(backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if backend:
        mctf.set_backend(backend)
    return device, rank, world, local_rank


def all_reduce(values: List[float], device, world: int) -> List[float]:
    if world <= 1:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


# ---------------------------------------------------------------------------
# evaluation


def _autocast(device, amp: Optional[str]):
    import torch

    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[amp])


def evaluate(forward, loader, device, amp: Optional[str], topk: int, progress: bool = False,
             desc: str = "") -> Dict[str, float]:
    """Sums over this process's images: correct top-1/top-k, loss, count. Not timed."""
    import torch
    import torch.nn.functional as F

    correct1 = correctk = loss_sum = count = 0.0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(loader), desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True)
    with torch.no_grad():
        for images, target in loader:
            images = images.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            with _autocast(device, amp):
                logits = forward(images)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            hits = logits.topk(topk, dim=1).indices.eq(target[:, None])
            correct1 += hits[:, 0].sum().item()
            correctk += hits.any(dim=1).sum().item()
            count += images.shape[0]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(top1=f"{100 * correct1 / count:.2f}")
    if bar is not None:
        bar.close()
    return dict(correct1=correct1, correctk=correctk, loss_sum=loss_sum, count=count)


def measure_throughput(model, configs: Dict, images, device, amp: Optional[str], timing: Dict,
                       max_spread: float, compile_backend: Optional[str] = None) -> Dict:
    """images/s per pass label (``configs``: label -> MCTF config, None for the unpatched model),
    with the shared methodology, the passes interleaved. Each pass times its own copy of the
    model, so no re-patching (and, with ``compile_backend``, no recompilation) happens between
    timed repeats."""
    import copy

    import torch

    steps = {}
    for label, config in configs.items():
        replica = common.patch_model(copy.deepcopy(model), config) if config is not None else model
        fwd = torch.compile(replica, backend=compile_backend) if compile_backend else replica

        def step(fwd=fwd):
            with torch.no_grad(), _autocast(device, amp):
                fwd(images)

        steps[label] = step
    timings = common.measure_interleaved(steps, device, **timing)
    out = {}
    for label, t in timings.items():
        stats = common.summarize(t["seconds_per_iter"], images.shape[0])
        reasons = common.noisy_reasons(stats["spread"], max_spread, None, t["warmup"]["stable"], stats["repeats"])
        out[label] = dict(stats, noisy=bool(reasons), noisy_reasons=reasons, timing_batch=images.shape[0],
                          iters_per_repeat=t["iters_per_repeat"], warmup_iters=t["warmup"]["iters"])
    return out


def format_table(results: List[Dict], topk: int, repeats: int) -> str:
    header = (f"{'r':>6} {'top-1':>7} {f'top-{topk}':>7} {'loss':>8} {'GFLOPs':>8} {'img/s':>9} "
              f"{'range (min-max)':>17}  tokens after each block")
    lines = [header, "-" * len(header)]
    noisy = 0
    for row in results:
        r = "-" if row["r"] is None else str(row["r"])
        tokens = ",".join(str(t) for t in row["tokens_per_block"])
        ips = row.get("images_per_s")
        rng = f"{row['ips_min']:.1f}-{row['ips_max']:.1f}" if ips else "-"
        flag = ""
        if row.get("noisy"):
            noisy += 1
            flag = "  NOISY: " + "; ".join(row["noisy_reasons"])
        lines.append(f"{r:>6} {row['top1']:>7.2f} {row['top5']:>7.2f} {row['loss']:>8.4f} {row['gflops']:>8.3f} "
                     f"{'-' if not ips else format(ips, '9.1f'):>9} {rng:>17}  {tokens}{flag}")
    if any(row.get("images_per_s") for row in results):
        batch = results[0].get("timing_batch")
        lines.append(f"img/s: forward passes only (data loading excluded) on one batch of {batch} images, median of "
                     f"{repeats} interleaved repeats after warmup; range min-max. bench/NOTES.md, 'How we measure'.")
    if noisy:
        lines.append(f"{noisy} row(s) NOISY: their img/s are not results (rerun on an idle machine or with more "
                     f"--repeats / --seconds).")
    return "\n".join(lines)


def run(args, parsed: Dict) -> Tuple[Dict, bool]:
    """Evaluate; returns (the report, whether this is rank 0) on every rank, or raises UsageError."""
    import timm
    import torch

    import mctf

    device = common.resolve_device(args.device) if args.device != "auto" else None
    # the name, its kwargs and MCTF's support of it, on the meta device: no weights, no data yet
    common.check_supported(args.model, dict(parsed["model_kwargs"], **(
        {"num_classes": args.num_classes} if args.num_classes is not None else {})),
        lambda depth: common.build_config(args, depth))
    device, rank, world, local_rank = start_rank(device, args.device, parsed["backend"])
    main_rank = rank == 0

    torch.manual_seed(args.seed)
    model = common.create_model(args.model, parsed["model_kwargs"], args.num_classes, args.pretrained,
                                args.checkpoint)
    depth = len(getattr(model, "blocks", ()))
    config = common.build_config(args, depth)
    model = common.patch_model(model, config).to(device)
    forward = torch.compile(model, backend=args.compile_backend) if args.compile else model

    data_config = common.data_config_for(model, args.crop_pct)
    from timm.data import create_transform

    dataset = build_dataset(args.data_path, create_transform(**data_config, is_training=False))
    num_classes = model.num_classes
    if len(dataset.classes) > num_classes:
        raise UsageError(f"{args.data_path} has {len(dataset.classes)} classes but the model has {num_classes} "
                         f"outputs (set --num-classes)")
    if len(dataset.classes) != num_classes and main_rank:
        log(f"mctf-eval: warning: {len(dataset.classes)} class folders for a {num_classes}-class model; "
            f"folder i (sorted by name) is scored as class i")
    topk = min(5, num_classes)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=shard_sampler(len(dataset), rank, world),
        num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=False,
    )
    if main_rank:
        cfg_text = common.describe_config(config)
        log(f"mctf-eval: {args.model} on {device} x{world}, {len(dataset)} images in {len(dataset.classes)} "
            f"classes, amp={args.amp or 'off'}, backend={mctf.get_backend()}, compile={args.compile}, {cfg_text}")
        log(f"mctf-eval: data {data_config}")

    r_values = parsed["r_values"]
    passes = [None] if config is None else (r_values if r_values is not None else [config.r])
    probe = torch.zeros(1, *data_config["input_size"], device=device)
    results, configs = [], {}
    for i, r in enumerate(passes):
        pass_config = None if config is None else config.replace(r=r)
        if pass_config is not None:
            common.patch_model(model, pass_config)
        tokens = common.planned_tokens(model)
        gflops = common.gflops_per_image(model, probe)
        sums = evaluate(forward, loader, device, args.amp, topk, progress=main_rank and not args.no_progress,
                        desc=f"r={r}" if r is not None else "baseline")
        correct1, correctk, loss_sum, count = all_reduce(
            [sums["correct1"], sums["correctk"], sums["loss_sum"], sums["count"]], device, world)
        label = f"{i}:{r}"
        configs[label] = pass_config
        results.append(dict(
            r=r, mctf_type=common.mctf_type_of(pass_config),
            top1=100.0 * correct1 / count, top5=100.0 * correctk / count, loss=loss_sum / count, gflops=gflops,
            tokens_per_block=tokens, num_images=int(count), correct1=int(correct1), correct5=int(correctk),
            images_per_s=None, label=label,
        ))

    if not args.no_timing:
        # one batch of real images, transformed and already on the device: loading is not timed
        first = [dataset[i][0] for i in list(shard_sampler(len(dataset), rank, world))[:args.batch_size]]
        images = torch.stack(first).to(device)
        speeds = measure_throughput(model, configs, images, device, args.amp, parsed["timing"], args.max_spread,
                                    args.compile_backend if args.compile else None)
        for row in results:
            s = speeds[row["label"]]
            # every rank measures its own device; the job's throughput is their sum
            sums = all_reduce([s["images_per_s"], s["ips_min"], s["ips_max"]], device, world)
            row.update(s, images_per_s=sums[0], ips_min=sums[1], ips_max=sums[2])
    for row in results:
        row.pop("label")
    return dict(
        model=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
        data_path=os.path.abspath(args.data_path), num_images=len(dataset), num_classes=num_classes,
        dataset_classes=len(dataset.classes), topk=topk,
        data_config={k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        mctf_type=common.mctf_type_of(config),
        activate_layer=None if getattr(config, "layers", None) is None else list(config.layers),
        method=None if config is None else ("tome" if common.mctf_type_of(config) is None else "mctf"),
        amp=args.amp, compile=args.compile, device=str(device), device_name=common.device_name(device),
        world_size=world, batch_size=args.batch_size, backend=mctf.get_backend(), timing=parsed["timing"],
        results=results, torch=torch.__version__, timm=timm.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"),
    ), main_rank


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with cli_errors(parser):
        report, main_rank = run(args, check_args(args))
    if main_rank:
        print(format_table(report["results"], report["topk"], args.repeats))
        if args.output:
            common.write_json(args.output, report)
            log(f"mctf-eval: wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
