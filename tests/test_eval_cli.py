"""mctf-eval end to end on a tiny generated ImageFolder (CPU, random-init tiny DeiT)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import mctf
from mctf.cli import eval as eval_cli

MODEL = "deit_tiny_patch16_224"
KWARGS = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2)
BASE_ARGS = ["--model", MODEL, "--model-kwargs", json.dumps(KWARGS), "--num-classes", "3",
             "--batch-size", "4", "--workers", "0", "--no-progress", "--device", "cpu", "--no-timing"]
# the shortest honest timing: a 3-pass warmup capped at 1 s, two interleaved repeats
FAST_TIMING = ["--warmup", "3", "--warmup-seconds", "0", "--warmup-max-seconds", "1", "--repeats", "2",
               "--seconds", "0"]


def tiny_model():
    return timm.create_model(MODEL, pretrained=False, num_classes=3, **KWARGS).eval()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """3 classes x 3 images of assorted sizes and formats; 1 image more in class 'b'."""
    root = tmp_path_factory.mktemp("val")
    rng = np.random.default_rng(1)
    for c, name in enumerate(["a", "b", "c"]):
        os.makedirs(root / name)
        for i in range(3 + (name == "b")):
            h, w = 48 + 9 * i, 80 - 5 * i
            base = np.zeros((h, w, 3)) + np.array([200, 40, 90])[np.roll(np.arange(3), c)]
            pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def public_checkpoint(tmp_path_factory, image_folder):
    """Weights saved as the public code saves them: {'model': state_dict, 'optimizer': ..., 'epoch': ...}.
    The head is a nearest-centroid classifier with classes 1 and 2 swapped, so top-1 is neither 0 nor 100 %."""
    torch.manual_seed(123)
    model = tiny_model()
    images, labels = load_folder(model, image_folder)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(images), pre_logits=True)
        centroids = torch.stack([feats[labels == c].mean(0) for c in (0, 2, 1)])
        model.head.weight.copy_(2 * centroids)
        model.head.bias.copy_(-(centroids * centroids).sum(1))
    path = tmp_path_factory.mktemp("ckpt") / "mctf_tiny.pth"
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 29, "args": None}, path)
    return path, model.state_dict()


def load_folder(model, folder):
    """The folder through timm's eval transform, built here from the model's config."""
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    cfg = resolve_data_config({"input_size": (3, 64, 64), "crop_pct": 0.875}, model=model)
    data = ImageFolder(str(folder), transform=create_transform(**cfg))
    return torch.stack([data[i][0] for i in range(len(data))]), torch.tensor(data.targets)


def expected_correct(state_dict, folder, config, num_classes=3):
    """(top-1 hits, top-5 hits, mean loss, images) from the model's own forward."""
    model = timm.create_model(MODEL, pretrained=False, num_classes=num_classes, **KWARGS).eval()
    model.load_state_dict(state_dict)
    if config is not None:
        mctf.patch.timm(model, config)
    images, labels = load_folder(model, folder)
    with torch.no_grad():
        logits = model(images)
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    top5 = logits.topk(min(5, num_classes), dim=1).indices.eq(labels[:, None]).any(1)
    return int((logits.argmax(1) == labels).sum()), int(top5.sum()), loss, len(labels)


def run_cli(args, capsys):
    code = eval_cli.main(args)
    out = capsys.readouterr()
    assert code == 0
    return out


def test_eval_end_to_end_json_and_top1(image_folder, public_checkpoint, tmp_path, capsys):
    path, state_dict = public_checkpoint
    out_json = tmp_path / "results.json"
    timed = [a for a in BASE_ARGS if a != "--no-timing"] + FAST_TIMING
    out = run_cli(timed + ["--data-path", str(image_folder), "--checkpoint", str(path),
                           "--r", "0", "4", "0.3", "--output", str(out_json)], capsys)
    report = json.loads(out_json.read_text())
    for key in ("model", "checkpoint", "data_path", "num_images", "num_classes", "topk", "data_config",
                "mctf_type", "activate_layer", "amp", "device", "world_size", "results", "torch", "timm"):
        assert key in report
    assert report["num_images"] == 10 and report["num_classes"] == 3 and report["topk"] == 3
    assert report["world_size"] == 1 and report["activate_layer"] == [1, 2, 3]
    dc = report["data_config"]
    assert dc["input_size"] == [3, 64, 64] and dc["crop_pct"] == 0.875 and dc["interpolation"] == "bicubic"
    assert dc["mean"] == list(timm.data.IMAGENET_DEFAULT_MEAN) and dc["std"] == list(timm.data.IMAGENET_DEFAULT_STD)
    assert [row["r"] for row in report["results"]] == [0, 4, 0.3]
    base = mctf.MCTFConfig.preset("mctf", depth=4)
    for row in report["results"]:
        for key in ("top1", "top5", "loss", "images_per_s", "gflops", "tokens_per_block", "num_images",
                    "correct1", "correct5", "mctf_type"):
            assert key in row
        correct, _, loss, n = expected_correct(state_dict, image_folder, base.replace(r=row["r"]))
        assert row["num_images"] == n == 10
        assert 0 < correct < n  # a check with teeth: neither all wrong nor all right
        assert row["correct1"] == correct
        assert row["top1"] == pytest.approx(100.0 * correct / n)
        assert row["top5"] == 100.0  # top-3 of 3 classes
        assert row["loss"] == pytest.approx(loss, rel=1e-5)
        assert row["gflops"] > 0 and row["images_per_s"] > 0
        assert row["ips_min"] <= row["images_per_s"] <= row["ips_max"] and row["repeats"] == 2
        assert row["timing_batch"] == 4 and isinstance(row["noisy"], bool)
        assert row["noisy"] == bool(row["noisy_reasons"])
        assert row["mctf_type"][0] == row["r"]
    assert report["results"][0]["tokens_per_block"] == [65, 65, 65, 65]
    assert report["results"][1]["tokens_per_block"] == [65, 61, 57, 53]
    assert report["results"][0]["gflops"] > report["results"][2]["gflops"]
    # r=0 is the plain timm model
    assert report["results"][0]["correct1"] == expected_correct(state_dict, image_folder, None)[0]
    # the printed table
    lines = out.out.strip().splitlines()
    assert lines[0].split()[:9] == ["r", "top-1", "top-3", "loss", "GFLOPs", "img/s", "range", "(min-max)", "tokens"]
    assert [line.split()[0] for line in lines[2:5]] == ["0", "4", "0.3"]
    assert "data loading excluded" in out.out and "median of 2 interleaved repeats" in out.out


def test_baseline_preset_and_plain_state_dict(image_folder, tmp_path, capsys):
    """A plain (DDP-prefixed) state_dict of a 6-class model on the 3 folders: a warning, real top-5."""
    torch.manual_seed(7)
    state_dict = timm.create_model(MODEL, pretrained=False, num_classes=6, **KWARGS).state_dict()
    state_dict["head.bias"][0] = -100.0  # class 0 is never in the top 5: 3 images miss
    plain = tmp_path / "plain.pth"
    torch.save({"module." + k: v for k, v in state_dict.items()}, plain)
    out_json = tmp_path / "baseline.json"
    args = [a.replace("--num-classes", "--num-classes=6") for a in BASE_ARGS if a != "3"]
    out = run_cli(args + ["--data-path", str(image_folder), "--checkpoint", str(plain), "--preset", "baseline",
                          "--output", str(out_json)], capsys)
    assert "3 class folders for a 6-class model" in out.err
    report = json.loads(out_json.read_text())
    assert report["mctf_type"] is None and len(report["results"]) == 1 and report["topk"] == 5
    row = report["results"][0]
    assert row["r"] is None and row["tokens_per_block"] == [65] * 4
    correct1, correct5, loss, _ = expected_correct(state_dict, image_folder, None, num_classes=6)
    assert (row["correct1"], row["correct5"]) == (correct1, correct5) == (correct1, 7)
    assert row["loss"] == pytest.approx(loss, rel=1e-5)


def test_mismatched_checkpoint_names_keys(image_folder, public_checkpoint, tmp_path, capsys):
    _, state_dict = public_checkpoint
    bad = dict(state_dict)
    bad.pop("head.weight")
    bad["blocks.9.mlp.fc1.weight"] = torch.zeros(1)
    bad["pos_embed"] = torch.zeros(1, 10, 32)
    path = tmp_path / "bad.pth"
    torch.save({"model": bad}, path)
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(BASE_ARGS + ["--data-path", str(image_folder), "--checkpoint", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "head.weight" in err and "blocks.9.mlp.fc1.weight" in err and "pos_embed" in err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def bad_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "no_images" / "cls").mkdir(parents=True)
    (root / "no_images" / "cls" / "notes.txt").write_text("not an image")
    (root / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(root / "flat" / "x.png")
    (root / "file.txt").write_text("x")
    (root / "junk.pth").write_bytes(b"not a checkpoint")
    return root


@pytest.mark.parametrize("extra, message", [
    (["--data-path", "{root}/missing"], "no such directory"),
    (["--data-path", "{root}/file.txt"], "not a directory"),
    (["--data-path", "{root}/empty"], "no class folders"),
    (["--data-path", "{root}/flat"], "no class folders"),
    (["--data-path", "{root}/no_images"], "no images found"),
    (["--data-path", "{images}", "--r", "-1"], "--r"),
    (["--data-path", "{images}", "--r", "abc"], "not a number"),
    (["--data-path", "{images}", "--r", "1.5"], "fraction"),
    (["--data-path", "{images}", "--checkpoint", "{root}/nope.pth"], "no such file"),
    (["--data-path", "{images}", "--checkpoint", "{root}/junk.pth"], "cannot read"),
    (["--data-path", "{images}", "--model", "deit_tiny_patch16_22"], "unknown timm model"),
    (["--data-path", "{images}", "--model-kwargs", "{img_size: 3"], "not valid JSON"),
    (["--data-path", "{images}", "--activate-layer", "7"], "do not exist"),
    (["--data-path", "{images}", "--mctf-type", "16", "0", "0"], "11 entries"),
    (["--data-path", "{images}", "--preset", "baseline", "--r", "4"], "baseline"),
    (["--data-path", "{images}", "--output", "{root}/no/dir/r.json"], "--output"),
    (["--data-path", "{images}", "--device", "gpu0"], "--device"),
    (["--data-path", "{images}", "--model-kwargs", "img_size"], "key=value"),
    (["--data-path", "{images}", "--batch-size", "0"], "--batch-size"),
    (["--data-path", "{images}", "--repeats", "0"], "--repeats"),
])
def test_bad_input_gives_clear_error(bad_folders, image_folder, extra, message, capsys):
    args = BASE_ARGS + [a.replace("{root}", str(bad_folders)).replace("{images}", str(image_folder)) for a in extra]
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "mctf-eval: error:" in err and message in err and "Traceback" not in err


def _fails(args, capsys, message):
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "mctf-eval: error:" in err and message in err and "Traceback" not in err
    return err


def test_triton_backend_without_cuda_or_interpreter(image_folder, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine can run the Triton backend; the error is for machines that cannot")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    err = _fails(BASE_ARGS + ["--data-path", str(image_folder), "--backend", "triton"], capsys, "backend triton")
    assert "TRITON_INTERPRET" in err and "mctf-eval: deit" not in err  # stopped before the run started
    monkeypatch.setenv("MCTF_BACKEND", "triton")
    _fails(BASE_ARGS + ["--data-path", str(image_folder)], capsys, "backend triton")


def test_unsupported_model(image_folder, capsys):
    args = ["-m", "resnet18", "--num-classes", "3", "--no-progress", "--device", "cpu", "--data-path", str(image_folder)]
    err = _fails(args, capsys, "supports timm VisionTransformer")
    assert "resnet18" in err and "ResNet" in err


def test_bogus_backend_env(image_folder, monkeypatch, capsys):
    monkeypatch.setenv("MCTF_BACKEND", "bogus")
    _fails(BASE_ARGS + ["--data-path", str(image_folder)], capsys, "MCTF_BACKEND='bogus' is not a backend")


def test_key_value_kwargs_equal_json(image_folder, tmp_path, capsys):
    """timm's --model-kwargs key=value ... builds the same model as the JSON form, with the
    short options -m -b -j."""
    kv = [f"{k}={v}" for k, v in KWARGS.items()]
    args = ["-m", MODEL, "--model-kwargs", *kv, "--num-classes", "3", "-b", "5", "-j", "0", "--no-progress",
            "--device", "cpu", "--no-timing", "--data-path", str(image_folder), "--r", "4"]
    run_cli(args + ["--output", str(tmp_path / "kv.json")], capsys)
    json_args = BASE_ARGS + ["--data-path", str(image_folder), "--r", "4", "--output", str(tmp_path / "js.json")]
    run_cli(json_args, capsys)
    a, b = json.loads((tmp_path / "kv.json").read_text()), json.loads((tmp_path / "js.json").read_text())
    assert a["batch_size"] == 5 and a["data_config"] == b["data_config"]
    assert [(r["correct1"], r["tokens_per_block"], r["gflops"]) for r in a["results"]] == [
        (r["correct1"], r["tokens_per_block"], r["gflops"]) for r in b["results"]]


@pytest.mark.slow
def test_compile_option(image_folder, tmp_path, capsys):
    """--compile evaluates through torch.compile (aot_eager: tracing without code generation) with
    the same counts."""
    args = BASE_ARGS + ["--data-path", str(image_folder), "--r", "4", "--compile-backend", "aot_eager"]
    run_cli(args + ["--output", str(tmp_path / "plain.json")], capsys)
    run_cli(args + ["--compile", "--output", str(tmp_path / "compiled.json")], capsys)
    a, b = json.loads((tmp_path / "plain.json").read_text()), json.loads((tmp_path / "compiled.json").read_text())
    assert b["compile"] is True and a["compile"] is False
    assert (a["results"][0]["correct1"], a["results"][0]["num_images"]) == (
        b["results"][0]["correct1"], b["results"][0]["num_images"])
    assert b["results"][0]["loss"] == pytest.approx(a["results"][0]["loss"], rel=1e-4)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(image_folder, public_checkpoint, tmp_path, capsys):
    """2 gloo ranks on CPU, disjoint shards (10 images: 5 + 5, the odd split has no duplicates)."""
    path, _ = public_checkpoint
    single = tmp_path / "single.json"
    common = BASE_ARGS + ["--data-path", str(image_folder), "--checkpoint", str(path), "--batch-size", "3"]
    run_cli(common + ["--r", "0", "4", "--output", str(single)], capsys)
    double = tmp_path / "double.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "mctf.cli.eval", *common, "--r-evals", "0", "4", "--output", str(double)],
        capture_output=True, text=True, env=env, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(double.read_text())
    assert b["world_size"] == 2
    assert proc.stdout.count("top-1") == 1  # only rank 0 prints
    for x, y in zip(a["results"], b["results"]):
        assert y["num_images"] == x["num_images"] == 10
        assert (y["correct1"], y["correct5"]) == (x["correct1"], x["correct5"])
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)


def test_tome_preset(image_folder, public_checkpoint, tmp_path, capsys):
    """--preset tome-r<N> evaluates Token Merging; --r replaces r in every block; the counts are the
    ToMe-patched model's own."""
    path, state_dict = public_checkpoint
    out_json = tmp_path / "tome.json"
    out = run_cli(BASE_ARGS + ["--data-path", str(image_folder), "--checkpoint", str(path), "--preset", "tome-r8",
                               "--r", "8", "0", "--output", str(out_json)], capsys)
    assert "tome r=8" in out.err
    report = json.loads(out_json.read_text())
    assert report["method"] == "tome" and report["mctf_type"] is None
    r8, r0 = report["results"]
    assert r8["tokens_per_block"] == [57, 49, 41, 33] and r0["tokens_per_block"] == [65] * 4
    correct1, correct5, loss, _ = expected_correct(state_dict, image_folder, mctf.ToMeConfig(r=8))
    assert (r8["correct1"], r8["correct5"]) == (correct1, correct5)
    assert r8["loss"] == pytest.approx(loss, rel=1e-5)
    _fails(BASE_ARGS + ["--data-path", str(image_folder), "--preset", "tome-r8", "--r", "0.5"], capsys, "whole number")
    _fails(BASE_ARGS + ["--data-path", str(image_folder), "--preset", "tome-r8", "--activate-layer", "1"], capsys,
           "every block")
