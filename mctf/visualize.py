"""Which patches each surviving token holds (source tracing), as a picture: the library
behind ``mctf-visualize`` (:mod:`mctf.cli.visualize`).

For every image, one panel with the input and one per requested block: the image
split into regions, one region per token left after that block (the patches the
token has fused), each filled with its mean colour (or a distinct colour) and
outlined. The model sees the image resized to its input size (no crop), so the
regions cover the whole picture; panels keep the input's own size.

Python use::

    vis = mctf.visualize.visualize(model, PIL.Image.open("cat.jpg"), layers=[2, 5, 8, 11])
    vis.label_maps[11]   # (H, W) int64: index of the final token holding each pixel's patch
    vis.panels[11]       # PIL image of that panel
    figure([vis]).save("cat_mctf.png")
"""
from __future__ import annotations

import colorsys
import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import mctf

STYLES = ("mean", "palette")


# ---------------------------------------------------------------------------
# source map -> label map -> picture


def label_map_from_source(source: torch.Tensor, num_prefix: int, grid: Tuple[int, int],
                          size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Integer map of which token holds each patch.

    source:     (T, T_in) 0/1 map of one image (token t holds input token j when source[t, j] = 1),
                as ``model.mctf_state.source[b]``; input tokens are ``num_prefix`` prefix tokens
                followed by the ``grid[0] * grid[1]`` patches in row-major order.
    size:       (H, W) of the output; default the patch grid itself. Pixel (y, x) belongs to
                patch (y * gh // H, x * gw // W).
    Returns an int64 array whose values are token indices t in [num_prefix, T).
    """
    gh, gw = grid
    if source.dim() != 2 or source.shape[1] != num_prefix + gh * gw:
        raise ValueError(f"source must be (T, {num_prefix + gh * gw}) for {num_prefix} prefix tokens and a "
                         f"{gh}x{gw} grid, got {tuple(source.shape)}")
    patches = source[:, num_prefix:].float()
    if not torch.all(patches.sum(dim=0) == 1):
        raise ValueError("source is not a partition: every patch must be held by exactly one token")
    labels = patches.argmax(dim=0).reshape(gh, gw).cpu().numpy().astype(np.int64)
    if size is None:
        return labels
    H, W = size
    rows = (np.arange(H) * gh) // H
    cols = (np.arange(W) * gw) // W
    return labels[rows[:, None], cols[None, :]]


def region_colours(labels: np.ndarray) -> Dict[int, Tuple[int, int, int]]:
    """A distinct, stable colour per label (golden-ratio hues, alternating lightness)."""
    colours = {}
    for label in np.unique(labels).tolist():
        hue = (label * 0.6180339887) % 1.0
        light = 0.45 if label % 2 else 0.6
        colours[label] = tuple(int(round(255 * c)) for c in colorsys.hls_to_rgb(hue, light, 0.75))
    return colours


def region_borders(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour lies in another region."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def render_regions(image, labels: np.ndarray, style: str = "mean", borders: bool = True):
    """The image with every region of ``labels`` filled (its mean colour, or a distinct colour
    blended with the image for ``style="palette"``) and, with ``borders``, outlined in black."""
    from PIL import Image

    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    if pixels.shape[:2] != labels.shape:
        raise ValueError(f"labels {labels.shape} do not match the image {pixels.shape[:2]}")
    flat = labels.reshape(-1)
    ids, inverse = np.unique(flat, return_inverse=True)
    if style == "mean":
        sums = np.zeros((len(ids), 3))
        np.add.at(sums, inverse, pixels.reshape(-1, 3))
        counts = np.bincount(inverse, minlength=len(ids))[:, None]
        out = (sums / counts)[inverse]
    else:
        colours = region_colours(labels)
        palette = np.array([colours[i] for i in ids.tolist()], dtype=np.float64)
        out = 0.45 * pixels.reshape(-1, 3) + 0.55 * palette[inverse]
    out = out.reshape(pixels.shape)
    if borders:
        out[region_borders(labels)] = 0.0
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------
# running the model


@dataclasses.dataclass
class Visualization:
    """Source maps of one image after the requested blocks.

    image:       the input (RGB, its own size)
    layers:      0-based block indices, in order
    sources:     block -> (T, T_in) 0/1 source map after that block
    label_maps:  block -> (H, W) int64 token index holding each pixel's patch
    tokens:      block -> tokens after that block
    panels:      block -> PIL image of the regions
    """

    image: object
    layers: List[int]
    sources: Dict[int, torch.Tensor]
    label_maps: Dict[int, np.ndarray]
    tokens: Dict[int, int]
    panels: Dict[int, object]


def default_layers(depth: int) -> List[int]:
    """Four blocks spread over the depth, the last included (2, 5, 8, 11 for 12 blocks)."""
    return sorted({max(depth * k // 4 - 1, 0) for k in range(1, 5)})


def model_input(model, image) -> torch.Tensor:
    """(1, 3, h, w) tensor of ``image`` squashed to the model's input size with timm's eval
    transform (model interpolation, mean and std; no crop, so every pixel is seen)."""
    from timm.data import create_transform, resolve_data_config

    args = {"crop_pct": 1.0, "crop_mode": "squash"}
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        args["input_size"] = (3, *img_size)
    transform = create_transform(**resolve_data_config(args, model=model), is_training=False)
    return transform(image.convert("RGB")).unsqueeze(0)


def visualize(model, image, layers: Optional[Sequence[int]] = None, style: str = "mean",
              borders: bool = True) -> Visualization:
    """Run the MCTF-patched ``model`` on one PIL image and draw its token regions after ``layers``
    (0-based blocks, negative counts from the end; default ``default_layers``). Source tracing is
    switched on for this call if the model's config has it off."""
    if not hasattr(model, "mctf_state"):
        raise ValueError("the model is not MCTF-patched: call mctf.patch.timm(model, config) first")
    depth = len(model.blocks)
    layers = default_layers(depth) if layers is None else list(layers)
    resolved = []
    for layer in layers:
        if not -depth <= layer < depth:
            raise ValueError(f"layer {layer} does not exist: the model has {depth} blocks (0..{depth - 1})")
        resolved.append(layer % depth)
    layers = sorted(set(resolved))

    config = model.mctf_config
    if not config.trace_source:
        mctf.patch.timm(model, config.replace(trace_source=True))
    num_prefix = model.num_prefix_tokens
    grid = tuple(model.patch_embed.grid_size)
    num_input = num_prefix + grid[0] * grid[1]
    captured: Dict[int, Tuple[torch.Tensor, int]] = {}

    def hook(index):
        def fn(module, inputs, output):
            source = model.mctf_state.source
            if source is None:  # nothing fused yet: every token holds itself
                source = torch.eye(num_input)
            else:
                source = source[0].detach().float().cpu().clone()
            captured[index] = (source, output.shape[1])
        return fn

    handles = [model.blocks[i].register_forward_hook(hook(i)) for i in layers]
    try:
        param = next(model.parameters())
        x = model_input(model, image).to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        if not config.trace_source:
            mctf.patch.timm(model, config)

    rgb = image.convert("RGB")
    size = (rgb.height, rgb.width)
    sources, label_maps, tokens, panels = {}, {}, {}, {}
    for i in layers:
        source, count = captured[i]
        sources[i] = source
        tokens[i] = count
        label_maps[i] = label_map_from_source(source, num_prefix, grid, size)
        panels[i] = render_regions(rgb, label_maps[i], style=style, borders=borders)
    return Visualization(rgb, layers, sources, label_maps, tokens, panels)


def figure(visualizations: Sequence[Visualization], captions: bool = True, gap: int = 4):
    """One row per image: the input, then one panel per block, captioned with the token count."""
    from PIL import Image, ImageDraw

    caption_h = 14 if captions else 0
    rows = []
    for vis in visualizations:
        cells = [("input", vis.image)] + [(f"block {i}: {vis.tokens[i]} tok", vis.panels[i]) for i in vis.layers]
        rows.append(cells)
    width = max(sum(c[1].width for c in cells) + gap * (len(cells) + 1) for cells in rows)
    height = sum(cells[0][1].height + caption_h + gap for cells in rows) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = gap
    for cells in rows:
        x = gap
        for caption, panel in cells:
            if captions:
                draw.text((x, y), caption, fill=(0, 0, 0))
            canvas.paste(panel, (x, y + caption_h))
            x += panel.width + gap
        y += cells[0][1].height + caption_h + gap
    return canvas


def demo_image(size: int = 224):
    """A synthetic scene (sky gradient, sun, hills, a house, a checkered field) for examples."""
    from PIL import Image, ImageDraw

    s = size / 224
    sky = np.linspace([70, 130, 220], [200, 225, 250], size)[:, None, :].repeat(size, axis=1)
    img = Image.fromarray(sky.astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse([160 * s, 18 * s, 204 * s, 62 * s], fill=(250, 210, 60))
    d.polygon([(0, 140 * s), (70 * s, 95 * s), (150 * s, 135 * s), (224 * s, 105 * s), (224 * s, 224 * s),
               (0, 224 * s)], fill=(70, 150, 70))
    d.rectangle([30 * s, 110 * s, 100 * s, 170 * s], fill=(200, 80, 60))
    d.polygon([(22 * s, 112 * s), (65 * s, 72 * s), (108 * s, 112 * s)], fill=(110, 50, 40))
    d.rectangle([56 * s, 135 * s, 74 * s, 170 * s], fill=(90, 60, 30))
    d.rectangle([38 * s, 122 * s, 52 * s, 134 * s], fill=(240, 240, 200))
    step = 14 * s
    for row in range(4):
        for col in range(8):
            if (row + col) % 2 == 0:
                x0, y0 = 112 * s + col * step, 168 * s + row * step
                d.rectangle([x0, y0, x0 + step - 1, y0 + step - 1], fill=(230, 200, 90))
    return img
