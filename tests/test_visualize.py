"""mctf-visualize: label maps follow the source map, panels keep the input's size."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import mctf
from mctf import visualize as vz
from mctf.cli import visualize as vz_cli

KWARGS = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=3)
CLI_MODEL = ["--model", "deit_tiny_patch16_224", "--model-kwargs",
             '{"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}', "--num-classes", "3"]


def tiny_patched(r=6):
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, **KWARGS).eval()
    return mctf.patch.timm(model, mctf.MCTFConfig(r=r, layers=(1, 2, 3)))


def test_label_map_from_source_by_hand():
    # 1 class token + a 2x2 grid; token 1 holds patches 0 and 3, token 2 holds 1 and 2
    source = torch.tensor([[1, 0, 0, 0, 0],
                           [0, 1, 0, 0, 1],
                           [0, 0, 1, 1, 0]], dtype=torch.float32)
    assert vz.label_map_from_source(source, 1, (2, 2)).tolist() == [[1, 2], [2, 1]]
    big = vz.label_map_from_source(source, 1, (2, 2), size=(3, 5))
    assert big.tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 2, 2], [2, 2, 2, 1, 1]]
    with pytest.raises(ValueError, match="partition"):
        vz.label_map_from_source(source[:2], 1, (2, 2))
    with pytest.raises(ValueError, match="source must be"):
        vz.label_map_from_source(source, 1, (3, 2))


def test_visualize_matches_source_map():
    model = tiny_patched()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))  # not square, not 64
    vis = vz.visualize(model, image, layers=[0, 2, -1], borders=False)
    assert vis.layers == [0, 2, 3]
    assert vis.tokens == {0: 65, 2: 53, 3: 47}
    assert not model.mctf_config.trace_source  # tracing only for the call

    # the final layer's source is the model's own source map for the same input
    traced = mctf.patch.timm(tiny_patched(), mctf.MCTFConfig(r=6, layers=(1, 2, 3), trace_source=True))
    traced.load_state_dict(model.state_dict())
    with torch.no_grad():
        traced(vz.model_input(traced, image))
    source = traced.mctf_state.source[0]
    assert torch.equal(vis.sources[3], source)

    labels = vis.label_maps[3]
    assert labels.shape == (50, 70) and vis.panels[3].size == (70, 50)
    ys, xs = np.mgrid[0:50, 0:70]
    patch = (ys * 8 // 50) * 8 + (xs * 8 // 70)
    expected = source[:, 1:].argmax(0).numpy()[patch]
    assert np.array_equal(labels, expected)
    assert len(np.unique(labels)) == 47 - 1  # one region per final token (class token excluded)
    assert np.array_equal(np.unique(vis.label_maps[0]), np.arange(1, 65))  # nothing fused yet

    # every region is one colour, distinct regions are told apart by the label map
    pixels = np.asarray(vis.panels[3]).reshape(-1, 3)
    for label in np.unique(labels):
        assert len(np.unique(pixels[labels.reshape(-1) == label], axis=0)) == 1
    palette = np.asarray(vz.render_regions(image, labels, style="palette", borders=False)).reshape(-1, 3)
    colours = vz.region_colours(labels)
    assert len(set(colours.values())) == len(colours)
    img = np.asarray(image).reshape(-1, 3).astype(float)
    for label, colour in colours.items():
        sel = labels.reshape(-1) == label
        assert np.allclose(palette[sel], 0.45 * img[sel] + 0.55 * np.array(colour), atol=0.51)


def test_borders_outline_regions():
    labels = np.array([[1, 1, 2], [1, 1, 2], [3, 3, 3]])
    edge = vz.region_borders(labels)
    assert edge.tolist() == [[False, True, False], [True, True, True], [False, False, False]]
    out = np.asarray(vz.render_regions(Image.new("RGB", (3, 3), (200, 100, 50)), labels))
    assert (out[edge] == 0).all() and (out[~edge] == [200, 100, 50]).all()


def test_cli_writes_png(tmp_path, capsys):
    rng = np.random.default_rng(1)
    paths = []
    for i, (h, w) in enumerate([(40, 56), (64, 64)]):
        paths.append(tmp_path / f"im{i}.{'jpg' if i else 'png'}")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    out = tmp_path / "vis.png"
    assert vz_cli.main([str(p) for p in paths] + CLI_MODEL + ["--r", "6", "--layers", "1", "3", "--output", str(out)]) == 0
    picture = Image.open(out)
    assert picture.format == "PNG"
    gap, caption = 4, 14
    # rows: input + 2 panels, each at the image's own size
    assert picture.size == (gap + 3 * (64 + gap), gap + (40 + caption + gap) + (64 + caption + gap))
    assert "block 3: 47" in capsys.readouterr().err
    # a checkpoint in the public format is accepted
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, **KWARGS)
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "epoch": 1}, ckpt)
    assert vz_cli.main([str(paths[0]), "--checkpoint", str(ckpt), "--no-captions", "--output", str(out)] + CLI_MODEL) == 0
    assert Image.open(out).size[1] == 40 + 2 * gap


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing.png"], "no such image file"),
    (["{tmp}/notes.txt"], "cannot read image"),
    ([], "one or more image files"),
    (["{tmp}/ok.png", "--layers", "4"], "does not exist"),
    (["{tmp}/ok.png", "--preset", "baseline"], "fuses nothing"),
    (["{tmp}/ok.png", "--r", "2", "3"], "one --r value"),
    (["{tmp}/ok.png", "--checkpoint", "{tmp}/none.pth"], "no such file"),
])
def test_cli_bad_input(tmp_path, args, message, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    Image.new("RGB", (16, 16)).save(tmp_path / "ok.png")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args] + CLI_MODEL + ["--output", str(tmp_path / "o.png")]
    with pytest.raises(SystemExit) as exit_info:
        vz_cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "mctf-visualize: error:" in err and message in err and "Traceback" not in err


def test_cli_styles_match_library():
    assert vz_cli.STYLES == vz.STYLES


def test_cli_key_value_kwargs_and_demo(tmp_path):
    out = tmp_path / "demo.png"
    kv = ["img_size=64", "patch_size=8", "embed_dim=32", "depth=4", "num_heads=2"]
    assert vz_cli.main(["--demo", "-m", "deit_tiny_patch16_224", "--model-kwargs", *kv, "--num-classes", "3",
                        "-o", str(out)]) == 0
    assert Image.open(out).size[0] > 64


def test_cli_tome_preset(tmp_path, capsys):
    """Token Merging's regions: --preset tome-r<N>, --r replacing N."""
    out = tmp_path / "tome.png"
    assert vz_cli.main(["--demo"] + CLI_MODEL + ["--preset", "tome-r8", "--r", "6", "--layers", "3",
                                                 "--output", str(out)]) == 0
    assert "block 3: 41" in capsys.readouterr().err  # 65 tokens, 6 merged in each of 4 blocks
