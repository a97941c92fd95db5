"""mctf-visualize: draw which patches each token holds after chosen blocks (source tracing).

One row per image: the input, then one panel per block in --layers, the image split
into regions (one per token left after that block), each filled with its mean colour
or a distinct colour, and outlined. The drawing is the library mctf.visualize.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from mctf.cli import common
from mctf.cli.common import UsageError, log

STYLES = ("mean", "palette")  # mctf.visualize.STYLES, repeated so that --help does not import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mctf-visualize", description=__doc__.split("\n\n")[0],
                                formatter_class=common.HelpFormatter)
    p.add_argument("images", nargs="*", help="image files (any format Pillow reads)")
    p.add_argument("--demo", action="store_true", help="add the built-in synthetic scene (no image needed)")
    p.add_argument("-o", "--output", required=True, help="PNG to write (required)")
    p.add_argument("--layers", nargs="+", type=int, metavar="I",
                   help="0-based blocks after which to draw (negative: from the end); default: 4 blocks spread "
                        "over the depth, the last included")
    p.add_argument("--style", choices=STYLES, default="mean",
                   help="mean: regions in their mean colour; palette: a distinct colour per region")
    p.add_argument("--no-borders", action="store_true", help="do not outline the regions")
    p.add_argument("--no-captions", action="store_true", help="no token counts above the panels")
    p.add_argument("--seed", type=int, default=0, help="seed of a random-init model")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    common.add_model_arguments(p, default_model="deit_tiny_patch16_224")
    common.add_config_arguments(p, r_help="r for the config's active blocks (one value); default: the config's r")
    return p


def _load_images(paths: Sequence[str]):
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"no such image file: {path}")
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise UsageError(f"cannot read image {path}: {exc}") from None
    return images


def run(args) -> list:
    if not args.images and not args.demo:
        raise UsageError("give one or more image files (or --demo)")
    if not args.output.lower().endswith(".png"):
        raise UsageError(f"--output must be a .png file, got {args.output}")
    common.check_output_path(args.output)
    if args.preset == "baseline":
        raise UsageError("--preset baseline fuses nothing: choose mctf, mctf-fast or tome-r<N> (or --mctf-type)")
    if args.r is not None and len(args.r) != 1:
        raise UsageError("mctf-visualize takes one --r value")
    r_values = common.parse_r_values(args.r) if args.r is not None else None
    model_kwargs = common.parse_model_kwargs(args.model_kwargs)
    backend = args.backend or common.backend_from_env()
    images = _load_images(args.images)

    import torch

    import mctf
    from mctf import visualize as vz

    device = common.resolve_device(args.device)
    common.check_triton_backend(backend, device)
    if args.demo:
        images.append(vz.demo_image())
    torch.manual_seed(args.seed)
    model = common.create_model(args.model, model_kwargs, args.num_classes, args.pretrained, args.checkpoint)
    config = common.build_config(args, len(getattr(model, "blocks", ())))
    if r_values is not None:
        config = config.replace(r=r_values[0])
    if args.backend:
        mctf.set_backend(args.backend)
    model = common.patch_model(model, config.replace(trace_source=True)).to(device)
    try:
        return [vz.visualize(model, im, args.layers, style=args.style, borders=not args.no_borders) for im in images]
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        results = run(args)
    except UsageError as exc:
        parser.error(str(exc))
    from mctf import visualize as vz

    vz.figure(results, captions=not args.no_captions).save(args.output)
    for vis in results:
        counts = ", ".join(f"block {i}: {vis.tokens[i]}" for i in vis.layers)
        log(f"{vis.image.width}x{vis.image.height} image, tokens after {counts}")
    log(f"mctf-visualize: wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
