"""``mctf-bench``: throughput of random-init timm ViTs, baseline vs MCTF presets.

Runs on the best device available (CUDA if present, else CPU) and prints one
row per (model, preset): tokens after the blocks, GFLOPs per image counted by
``torch.utils.flop_counter``, images/s and speedup over the timm baseline.
Nothing is downloaded: models are random-init (throughput does not depend on
the weights' values, only on shapes; token counts are static).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Dict, List, Optional

import torch

import mctf

DEFAULT_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224")
PRESETS = ("baseline", "mctf", "mctf-fast")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_model(name: str, preset: str, device: torch.device, dtype: torch.dtype):
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=1000)
    model = model.to(device=device, dtype=dtype).eval()
    if preset != "baseline":
        model = mctf.patch.timm(model, mctf.MCTFConfig.preset(preset, depth=len(model.blocks)))
    return model


def input_size(model) -> tuple:
    return tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))


def gflops_per_image(model, images: torch.Tensor) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # the math backend decomposes attention into matmuls the counter sees on every
    # device (fused CPU attention kernels are not counted)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images[:1])
    return counter.get_total_flops() / 1e9 / 2  # multiply-accumulates, the usual "FLOPs" of ViT papers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(model, images: torch.Tensor, warmup: int, min_seconds: float, max_iters: int) -> float:
    device = images.device
    with torch.no_grad():
        for _ in range(warmup):
            model(images)
        _sync(device)
        iters, start = 0, time.perf_counter()
        while iters < max_iters and (iters == 0 or time.perf_counter() - start < min_seconds):
            model(images)
            iters += 1
            _sync(device)
        elapsed = time.perf_counter() - start
    return iters * images.shape[0] / elapsed


def token_summary(model, images: torch.Tensor) -> str:
    if not hasattr(model, "mctf_state"):
        return f"{model.patch_embed.num_patches + model.num_prefix_tokens} (all blocks)"
    counts = model.mctf_state.planned_tokens(model.patch_embed.num_patches + model.num_prefix_tokens)
    start = model.patch_embed.num_patches + model.num_prefix_tokens
    return f"{start}->{counts[-1]} (" + ",".join(str(c) for c in counts) + ")"


def run(args) -> List[Dict]:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    batch = args.batch_size or (256 if device.type == "cuda" else 8)
    if args.backend:
        mctf.set_backend(args.backend)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    _log(f"mctf-bench: device={device} ({device_name}) dtype={dtype_name} batch={batch} backend={mctf.get_backend()}")
    rows = []
    jobs = [(m, p) for m in args.models for p in args.presets]
    for n, (name, preset) in enumerate(jobs, 1):
        _log(f"[{n}/{len(jobs)}] {name} {preset} ...")
        model = build_model(name, preset, device, dtype)
        images = torch.randn(batch, *input_size(model), device=device, dtype=dtype)
        flops = gflops_per_image(model, images)
        ips = images_per_second(model, images, args.warmup, args.seconds, args.max_iters)
        rows.append(dict(model=name, preset=preset, tokens=token_summary(model, images), gflops=flops,
                         images_per_s=ips, device=str(device), device_name=device_name, dtype=dtype_name,
                         batch=batch, backend=mctf.get_backend()))
        del model, images
    for row in rows:
        base = next((b for b in rows if b["model"] == row["model"] and b["preset"] == "baseline"), None)
        row["speedup"] = row["images_per_s"] / base["images_per_s"] if base else None
        row["flop_ratio"] = base["gflops"] / row["gflops"] if base else None
    return rows


def format_table(rows: List[Dict]) -> str:
    header = f"{'model':<26} {'preset':<10} {'GFLOPs':>7} {'img/s':>9} {'speedup':>8} {'ideal':>6}  tokens after each block"
    lines = [header, "-" * len(header)]
    for r in rows:
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        ideal = f"{r['flop_ratio']:.2f}x" if r["flop_ratio"] else "-"
        lines.append(f"{r['model']:<26} {r['preset']:<10} {r['gflops']:>7.2f} {r['images_per_s']:>9.1f} {speed:>8} {ideal:>6}  {r['tokens']}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="mctf-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="timm model names")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--batch-size", type=int, help="default 256 on CUDA, 8 on CPU")
    p.add_argument("--backend", choices=mctf.BACKENDS, help="mctf_kernels backend (default $MCTF_BACKEND or auto)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seconds", type=float, default=2.0, help="minimum timed seconds per row")
    p.add_argument("--max-iters", type=int, default=200)
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    rows = run(args)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, torch=torch.__version__, date=time.strftime("%Y-%m-%d")), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
