"""mctf-train end to end on CPU: a generated colour-class ImageFolder, a 4-block ViT, 2 epochs."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import mctf
from mctf.checkpoint import SAFE_GLOBALS
from mctf.cli import eval as eval_cli
from mctf.cli import train as train_cli

MODEL = "vit_tiny_patch16_224"
KWARGS = ["img_size=64", "patch_size=8", "embed_dim=32", "depth=4", "num_heads=2"]
MCTF = ["--mctf-type", "8", "4", "0", "1", "1", "1", "20", "40", "1", "1", "0", "--activate-layer", "1", "2", "3"]
# lr 2e-3 at a global batch of 8 (--lr-base-size 8, --lr-times 1): a toy task learns in 2 epochs;
# drop path 0: its random masks depend on the per-process batch, so 1 and 2 processes would differ;
# consistency threshold 0.01: every sample passes, so each rank's mean over its passing samples
# averages to the global one (the public code normalises per process)
BASE = ["--task-type", "1", "1", "0.01", "-m", MODEL, "--model-kwargs", *KWARGS, *MCTF, "-j", "0", "--epochs", "2",
        "--cooldown-epochs", "0",
        "--lr", "2e-3", "--lr-base-size", "8", "--lr-times", "1", "--drop-path", "0", "--device", "cpu",
        "--no-progress", "--model-ema-decay", "0.9"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the ranks import this checkout
COLOURS = {"blue": (40, 40, 200), "green": (40, 200, 40), "red": (200, 40, 40)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is several times faster than two
    (no oversubscription), and the torchrun ranks get one each too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train/ 16 and val/ 6 noisy images per colour class, assorted sizes (a learnable toy task)."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 6)):
        for name, rgb in COLOURS.items():
            os.makedirs(root / split / name)
            for i in range(n):
                h, w = rng.integers(40, 80, 2)
                pixels = np.clip(np.array(rgb) + rng.normal(0, 50, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def read_log(path):
    return [json.loads(line) for line in open(path / "log.jsonl")]


def train(args, capsys=None):
    code = train_cli.main([str(a) for a in args])
    assert code == 0
    return capsys.readouterr() if capsys else None


def tiny(num_classes=3, model=MODEL, **extra):
    kwargs = {k: int(v) for k, v in (kv.split("=") for kv in KWARGS)}
    return timm.create_model(model, pretrained=False, num_classes=num_classes, **{**kwargs, **extra})


def ckpt(path):
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        return torch.load(path, weights_only=True)


def assert_same(a, b, where=""):
    """Bit-for-bit equal nested checkpoint contents."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """One 2-epoch run (batch 8, every epoch's checkpoint kept)."""
    out = tmp_path_factory.mktemp("run") / "out"
    train(BASE + ["--data-path", data, "-b", "8", "--save-every", "1", "--output", out])
    return out


def test_two_epochs_learn_and_write_public_checkpoints(run, data, capsys):
    log = read_log(run)
    assert [r["event"] for r in log] == ["start", "epoch", "epoch", "end"]
    first, last = log[1], log[2]
    assert first["steps"] == last["steps"] == 48 // 8
    assert last["train_loss"] < first["train_loss"]  # the toy task is learned
    assert last["loss_student"] < first["loss_student"] and last["loss"] < first["loss"]
    assert last["top1"] > 80 and last["num_images"] == 18  # chance is 33 %
    assert log[0]["args"]["mctf_type_resolved"] == [8, 4, 0, 1, 1, 1, 20, 40, 1, 1, 0]
    assert log[0]["args"]["lr_scaled"] == pytest.approx(2e-3)
    assert log[3]["best_top1"] == max(first["top1"], last["top1"])

    saved = ckpt(run / "checkpoint.pth")
    assert {"model", "optimizer", "lr_scheduler", "epoch", "scaler", "args", "state_dict_ema"} <= saved.keys()
    assert saved["epoch"] == 1 and saved["scaler"] is None and saved["args"].model == MODEL
    assert not torch.equal(saved["model"]["head.weight"], saved["state_dict_ema"]["head.weight"])
    # our loader, into the plain and the patched model
    model = mctf.load_checkpoint(tiny(), str(run / "checkpoint.pth"))
    assert torch.equal(model.state_dict()["head.weight"], saved["model"]["head.weight"])
    ema = mctf.load_checkpoint(tiny(), str(run / "model_ema.pth"))
    assert torch.equal(ema.state_dict()["head.weight"], saved["state_dict_ema"]["head.weight"])
    # mctf-eval reads it and scores it as the training run's own evaluation did
    out_json = run.parent / "eval.json"
    capsys.readouterr()
    assert eval_cli.main(["-m", MODEL, "--model-kwargs", *KWARGS, "--num-classes", "3", *MCTF,
                          "--data-path", str(data / "val"), "--checkpoint", str(run / "checkpoint.pth"), "-j", "0",
                          "--no-progress", "--no-timing", "--device", "cpu", "--output", str(out_json)]) == 0
    row = json.loads(out_json.read_text())["results"][0]
    assert row["top1"] == last["top1"] and row["loss"] == pytest.approx(last["loss"], rel=1e-6)


def test_resume_continues_bit_for_bit(run, data, tmp_path, capsys):
    """Epoch 1 resumed from epoch 0's checkpoint equals epoch 1 of the uninterrupted run."""
    out = tmp_path / "resumed"
    train(BASE + ["--data-path", data, "-b", "8", "--resume", run / "checkpoint-0.pth", "--output", out])
    resumed, straight = ckpt(out / "checkpoint.pth"), ckpt(run / "checkpoint.pth")
    for key in ("model", "state_dict_ema", "optimizer", "lr_scheduler", "epoch"):
        assert_same(resumed[key], straight[key], key)
    assert "warning: resuming with other settings" not in capsys.readouterr().err
    log = read_log(out)
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [1]
    assert log[1] == {**read_log(run)[2], "train_seconds": log[1]["train_seconds"],
                      "train_images_per_s": log[1]["train_images_per_s"]}


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(run, data, tmp_path):
    """2 processes x batch 4 (Gloo) against the 1-process run with batch 8: the same images in the
    same global steps, the same teacher r, the gradients averaged by DDP."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mctf.cli.train", *map(str, BASE), "--data-path", str(data), "-b", "4", "--output", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_log(run), read_log(out)
    assert two[0]["args"]["world_size"] == 2 and two[0]["args"]["lr_scaled"] == one[0]["args"]["lr_scaled"]
    for a, b in zip(one[1:3], two[1:3]):
        assert a["steps"] == b["steps"] == 6
        # each rank's half-batch mean, averaged by DDP, is the full-batch mean up to float32
        # rounding (measured: losses at most 1.4e-6 apart, relative 7e-7, over these two epochs)
        for key in ("train_loss", "loss_student", "loss_teacher", "loss_consistency", "loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
        assert b["top1"] == a["top1"] and b["ema_top1"] == a["ema_top1"] and b["num_images"] == a["num_images"]
    w1, w2 = ckpt(run / "checkpoint.pth"), ckpt(out / "checkpoint.pth")
    steps, lr, dim = 12, 2e-3, 32
    for key in ("model", "state_dict_ema"):
        for name, p in w1[key].items():
            q = w2[key][name]
            if name.endswith("attn.qkv.bias"):
                # the key bias shifts every logit of a softmax row alike: its true gradient is 0 and
                # what autograd returns is rounding noise, which Adam divides by its own size into
                # steps of up to ~lr. Those entries may drift apart by lr per step; the rest must not.
                assert (q[dim:2 * dim] - p[dim:2 * dim]).abs().max() <= lr * steps
                p, q = torch.cat([p[:dim], p[2 * dim:]]), torch.cat([q[:dim], q[2 * dim:]])
            # float32 rounding of the gradients, through 12 Adam steps, each dividing a gradient
            # by its own running size (measured: at most 2.8e-6 apart, in pos_embed; 7x margin)
            torch.testing.assert_close(q, p, rtol=0, atol=2e-5, msg=f"{key}.{name}")


@pytest.mark.slow
def test_triton_backend_gradients_match_reference(device):
    """The training step (student + teacher + consistency) through the Triton kernels gives the
    reference's loss and gradients (CPU: Triton's interpreter)."""
    from timm.loss import LabelSmoothingCrossEntropy

    grads = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        model = mctf.patch.timm(tiny(), mctf.MCTFConfig.from_mctf_type([8, 4, 0, 1, 1, 1, 20, 40, 1, 1, 0],
                                                                       activate_layer=[1, 2, 3])).train().to(device)
        step = train_cli._step_module(model, (1, 1, 0.01), (1.0, 1.0, 3.0), LabelSmoothingCrossEntropy(0.1))
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(device)
        y = torch.tensor([0, 2], device=device)
        with mctf.use_backend(backend):
            losses = step(x, y, y[:, None], 3)
        losses[0].backward()
        grads[backend] = (torch.stack([t.detach() for t in losses]),
                          {n: p.grad.clone() for n, p in model.named_parameters()})
    # CPU: fp32 everywhere (measured: losses within 6e-9; gradients within 6.3e-6 absolute where a
    # tensor's largest gradient is ~1.9, i.e. ~3e-6 of its scale: the Triton backwards and torch's
    # attention sum in other orders than the reference, so a near-zero element of a large-gradient
    # tensor is compared at that tensor's scale); CUDA: the kernels' dots may run in TF32 (not yet
    # run on a GPU: the CUDA tolerance is a bound to confirm, not a measurement)
    rtol, scaled_atol = (1e-4, 1e-5) if device == "cpu" else (2e-2, 1e-3)
    torch.testing.assert_close(grads["triton"][0], grads["reference"][0], rtol=rtol, atol=1e-6)
    for name, g in grads["reference"][1].items():
        atol = scaled_atol * max(g.abs().max().item(), 0.1)
        torch.testing.assert_close(grads["triton"][1][name], g, rtol=rtol, atol=atol, msg=name)


def _bad(tmp_path, data):
    other = tmp_path / "other.pth"
    torch.save({"model": tiny(num_classes=5).state_dict()}, other)  # another model: a 5-class head
    odd = tmp_path / "odd"
    shutil.copytree(data, odd)
    shutil.rmtree(odd / "val" / "red")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "checkpoint.pth").write_bytes(b"x")
    noval = tmp_path / "noval"
    shutil.copytree(data / "train", noval / "train")
    plain = tmp_path / "plain.pth"
    torch.save(tiny().state_dict(), plain)
    wider, patch16, text = tmp_path / "wider.pth", tmp_path / "patch16.pth", tmp_path / "text.pth"
    torch.save({"model": tiny(num_classes=5, embed_dim=48).state_dict()}, wider)
    torch.save({"model": tiny(patch_size=16).state_dict()}, patch16)  # a 4x4 grid: resampled, but the patch
    text.write_text("not a checkpoint")                                # projection does not fit
    oblong = tmp_path / "oblong.pth"
    torch.save({**tiny().state_dict(), "pos_embed": torch.zeros(1, 1 + 50, 32)}, oblong)
    return {
        "missing data": (["--data-path", tmp_path / "nope"], "no such directory"),
        "no val split": (["--data-path", noval], "has no val/ folder"),
        "class mismatch": (["--data-path", odd], "same class folders"),
        "another model": (["--initial-checkpoint", other], "does not match"),
        "odd batch with mixup": (["--mixup", "0.8", "-b", "7"], "must be even"),
        "batch over the data": (["-b", "64"], "not one full step per epoch"),
        "negative r": (["--r", "-1"], "--r: '-1' must be a token count >= 0"),
        "fractional r > 1": (["--r", "1.5"], "must be a token count >= 0 or a fraction"),
        "bad teacher r": (["--r-teacher-max", "-2"], "--r-teacher-max"),
        "mctf-type r": (["--mctf-type", "-4", "2", "0", "1", "1", "1", "20", "40", "1", "1", "0"], "r (first value)"),
        "threshold": (["--task-type", "1", "1", "1.5"], "threshold"),
        "no loss": (["--task-type", "0", "0", "0"], "trains nothing"),
        "run exists": (["--output", taken], "already holds a run"),
        "resume of weights only": (["--resume", plain], "not an mctf-train checkpoint"),
        "unknown model": (["-m", "vit_nope"], "unknown timm model"),
        "unknown augmentation": (["--aa", "rand-q9"], "--aa 'rand-q9'"),
        "unknown erasing mode": (["--remode", "blur"], "argument --remode: invalid choice"),
        "unknown interpolation": (["--train-interpolation", "cubic"], "--train-interpolation 'cubic'"),
        "EMA decay": (["--model-ema-decay", "1.5"], "--model-ema-decay must be in [0, 1]"),
        "clip-grad": (["--clip-grad", "0"], "--clip-grad must be"),
        "finetune of another width": (["--finetune", wider], "does not fit VisionTransformer beyond its classifier"),
        "finetune of another patch size": (["--finetune", patch16], "patch_embed.proj.weight: checkpoint"),
        "finetune of no checkpoint": (["--finetune", text], "--finetune: checkpoint"),
        "finetune and a second start": (["--finetune", plain, "--initial-checkpoint", plain], "give one start"),
        "finetune missing": (["--finetune", tmp_path / "none.pth"], "--finetune: no such file"),
        "finetune of a non-square grid": (["--finetune", oblong], "is not 1 prefix token(s) and a square patch grid"),
    }


BAD = ["missing data", "no val split", "class mismatch", "another model", "odd batch with mixup",
       "batch over the data", "negative r", "fractional r > 1", "bad teacher r", "mctf-type r", "threshold",
       "no loss", "run exists", "resume of weights only", "unknown model", "unknown augmentation",
       "unknown erasing mode", "unknown interpolation", "EMA decay", "clip-grad", "finetune of another width",
       "finetune of another patch size", "finetune of no checkpoint", "finetune and a second start",
       "finetune missing", "finetune of a non-square grid"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_and_writes_nothing(case, data, tmp_path, capsys):
    extra, message = _bad(tmp_path, data)[case]
    out = tmp_path / "out"
    args = BASE + ["--data-path", data, "-b", "8", "--output", out] + extra
    if "--mctf-type" in extra:  # replace the base configuration
        i = args.index("--mctf-type")
        args = args[:i] + args[i + 16:]
    with pytest.raises(SystemExit) as exc:
        train_cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "mctf-train: error:" in err and message in err, err
    assert not out.exists() and not (tmp_path / "taken" / "log.jsonl").exists()


def test_pretrained_unreachable_is_a_clear_error(data, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    # no network and an empty cache, whatever the machine has
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        train_cli.main([str(a) for a in BASE + ["--data-path", data, "-b", "8", "--output", out, "--pretrained"]])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--pretrained: cannot get timm's weights" in err and "--initial-checkpoint" in err
    assert not out.exists()


@pytest.mark.parametrize("amp", ["bfloat16", "float16"])
def test_mixup_cutmix_and_amp_run_and_resume(amp, data, tmp_path):
    """Mixup/cutmix (soft targets, the confidence gate on both labels) under autocast; fp16 adds
    timm's loss scaler, whose state is saved and restored."""
    out = tmp_path / "out"
    args = BASE + ["--data-path", data, "-b", "8", "--mixup", "0.8", "--cutmix", "1.0", "--amp", "--amp-dtype", amp,
                   "--task-type", "1", "1", "0.2", "--save-every", "1"]
    train(args + ["--output", out])
    log = read_log(out)
    assert all(np.isfinite(r["train_loss"]) for r in log if r["event"] == "epoch")
    saved = ckpt(out / "checkpoint.pth")
    assert (saved["scaler"] is None) == (amp == "bfloat16")
    if amp == "float16":
        assert saved["scaler"]["scale"] > 0
        train(args + ["--resume", out / "checkpoint-0.pth", "--output", tmp_path / "resumed"])
        assert_same(ckpt(tmp_path / "resumed" / "checkpoint.pth")["model"], saved["model"], "model")


def test_repeated_augmentation_deals_one_global_list():
    """Ranks share one shuffled list of image copies: 2 ranks x batch 2 = 1 process x batch 4."""
    one = list(train_cli.RepeatedAugmentSampler(10, 1, 0, 3, seed=5))
    two = [list(train_cli.RepeatedAugmentSampler(10, 2, r, 3, seed=5)) for r in range(2)]
    assert len(one) == 10 and [len(t) for t in two] == [5, 5]
    for i in range(2):
        assert sorted(two[0][2 * i:2 * i + 2] + two[1][2 * i:2 * i + 2]) == sorted(one[4 * i:4 * i + 4])
    assert [c // 3 for c in one[:3]] == [one[0] // 3] * 3 and [c % 3 for c in one[:3]] == [0, 1, 2]
    later = train_cli.RepeatedAugmentSampler(10, 1, 0, 3, seed=5)
    later.set_epoch(1)
    assert list(later) != one  # a new order every epoch
    assert len(train_cli.RepeatedAugmentSampler(600, 4, 0, 3, seed=0)) == 512 // 4  # DeiT's rounding to 256
    plain = [list(train_cli.RepeatedAugmentSampler(600, 4, r, 1, seed=0)) for r in range(4)]  # no repeats:
    assert sorted(sum(plain, [])) == list(range(600))  # every image once, none rounded away


def test_seeded_samples_depend_on_image_copy_and_epoch_only():
    """A sample's augmentation is a function of (seed, epoch, image, copy): not of the order of
    loading, the process, or the global random state."""
    class Noise:
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.rand(3) + i

    samples = train_cli.SeededSamples(Noise(), seed=1, repeats=2)
    a = [samples[c] for c in range(4)]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    b = [samples[c] for c in reversed(range(4))][::-1]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is untouched
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])  # two copies of image 0 are augmented differently
    samples.epoch = 1
    assert not torch.equal(samples[0], a[0])


def test_posterize_to_zero_bits_gives_black_as_when_published():
    """RandAugment's increasing posterize keeps 0 bits at magnitude 10 (the recipe's m9 with mstd0.5
    draws it about 2% of the time); newer Pillow refuses 0 bits, older Pillow (the public runs) made
    the image black. The train transform keeps the published behaviour."""
    from timm.data import create_transform
    from timm.data.auto_augment import AugmentOp

    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    wrapped = train_cli.keep_zero_bit_posterize(create_transform(64, is_training=True, auto_augment="original"))
    image = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    assert np.asarray(train_cli.keep_zero_bit_posterize([op])[0](image)).max() == 0
    assert np.asarray(train_cli._posterize(image, 1)).max() == 128
    posterize_ops = []
    stack = [wrapped]
    while stack:
        t = stack.pop()
        if isinstance(t, (list, tuple)):
            stack.extend(t)
        elif isinstance(t, AugmentOp):
            posterize_ops += [t] if t.name.startswith("Posterize") else []
        else:
            stack.extend(c for a in ("transforms", "ops", "policy") for c in [getattr(t, a, None)] if c)
    assert posterize_ops and all(t.aug_fn is train_cli._posterize for t in posterize_ops)


def test_resume_an_earlier_checkpoint_in_its_own_folder(run, data, tmp_path, capsys):
    """Rolling a run back to a kept checkpoint continues it in place (another run's folder is refused)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    train(BASE + ["--data-path", data, "-b", "8", "--resume", copy / "checkpoint-0.pth"])
    train(BASE + ["--data-path", data, "-b", "8", "--resume", copy / "checkpoint-0.pth", "--lr", "1e-3"])
    assert "resuming with other settings than the run was saved with (lr_scaled 0.002 -> 0.001)" in \
        capsys.readouterr().err
    train(BASE + ["--data-path", data, "-b", "8", "--resume", copy / "checkpoint-0.pth"])
    assert_same(ckpt(copy / "checkpoint.pth")["model"], ckpt(run / "checkpoint.pth")["model"], "model")
    assert [r["event"] for r in read_log(copy)][-3:] == ["start", "epoch", "end"]


@pytest.mark.slow
def test_training_step_is_one_graph():
    """The whole step (teacher pass, student pass, losses, consistency gate) traces into one graph
    with fullgraph=True: no host synchronisation (.item(), data-dependent branches) inside it,
    and the teacher's r, drawn on the host, is a constant of the graph."""
    from timm.loss import LabelSmoothingCrossEntropy

    model = mctf.patch.timm(tiny(), mctf.MCTFConfig.from_mctf_type([8, 4, 0, 1, 1, 1, 20, 40, 1, 1, 0],
                                                                   activate_layer=[1, 2, 3])).train()
    step = train_cli._step_module(model, (1, 1, 0.4), (1.0, 1.0, 3.0), LabelSmoothingCrossEntropy(0.1))
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    with mctf.use_backend("reference"):  # with autograd on, as in training
        eager = step(x, y, y[:, None], 3)
        traced = torch.compile(step, backend="eager", fullgraph=True)(x, y, y[:, None], 3)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(b.detach(), a.detach())


def test_public_spellings_carry_over():
    """The public script's option names and bracketed lists parse to the same arguments."""
    parser = train_cli.build_parser()
    public = parser.parse_args(train_cli.expand_lists(
        ["--data_path", "d", "--mctf_type", "[16,8,0,1,1,1,20,40,1,1,0]", "--activate_layer", "[1,2,3]",
         "--task_type", "[1,1,0.4]", "--task_weight", "[1.0,1.0,3.0]", "--lr_times", "0.03", "--min_lr_times", "0.1",
         "--output_dir", "o", "--student-r", "12"]))
    ours = parser.parse_args(["--data-path", "d", "--mctf-type", *"16 8 0 1 1 1 20 40 1 1 0".split(),
                              "--activate-layer", "1", "2", "3", "--task-type", "1", "1", "0.4", "--task-weight", "1.0",
                              "1.0", "3.0", "--lr-times", "0.03", "--min-lr-times", "0.1", "--output", "o",
                              "--r", "12"])
    assert vars(public) == vars(ours)
    assert train_cli.expand_lists(["--model-kwargs", '{"a": [1, 2]}', "[]"]) == ["--model-kwargs", '{"a": [1, 2]}']


def test_a_diverging_run_stops_with_status_1(data, tmp_path, capsys):
    out = tmp_path / "out"
    code = train_cli.main([str(a) for a in BASE + ["--data-path", data, "-b", "8", "--output", out, "--opt", "sgd",
                                                   "--lr", "1e30", "--log-interval", "1"]])
    err = capsys.readouterr().err
    assert code == 1 and "mctf-train: loss is nan at epoch 0, step" in err, err
    assert not (out / "checkpoint.pth").exists()  # no epoch finished


def test_resume_of_another_models_run_is_refused(run, data, tmp_path, capsys):
    saved = ckpt(run / "checkpoint.pth")
    saved["model"] = tiny(num_classes=5).state_dict()
    other = tmp_path / "other.pth"
    torch.save(saved, other)
    with pytest.raises(SystemExit) as exc:
        train_cli.main([str(a) for a in BASE + ["--data-path", data, "-b", "8", "--resume", other,
                                                "--output", tmp_path / "out"]])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "mctf-train: error: --resume: checkpoint" in err and "head.weight" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchrun_consistency_only(data, tmp_path):
    """--task-type 0 0 C trains the class token's consistency alone: the classifier gets no gradient,
    which DDP must be told about (else it fails at the second step); its weights stay as
    initialised (no gradient: AdamW skips them, weight decay included, as in one process)."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mctf.cli.train", *map(str, BASE), "--data-path", str(data), "-b", "4", "--output", str(out),
           "--epochs", "1", "--task-type", "0", "0", "0.01"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    epoch = [r for r in read_log(out) if r["event"] == "epoch"]
    assert len(epoch) == 1 and epoch[0]["steps"] == 6 and epoch[0]["loss_consistency"] > 0
    assert epoch[0]["loss_student"] == epoch[0]["loss_teacher"] == 0
    torch.manual_seed(0)  # mctf-train's init: --seed 0 before the model is built
    init = tiny().state_dict()
    saved = ckpt(out / "checkpoint.pth")["model"]
    for name in ("head.weight", "head.bias"):
        assert torch.equal(saved[name], init[name]), name
    assert not torch.equal(saved["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("model, extra", [
    (MODEL, {}),
    ("deit_tiny_distilled_patch16_224", {}),  # 2 prefix tokens, two classifiers
    (MODEL, {"reg_tokens": 2, "no_embed_class": True}),  # the position embedding covers the patches only
])
def test_finetune_adapts_classifier_and_position_embedding(model, extra, tmp_path):
    """Weights of a 5-class model at 32 px (4x4 patches) into a 3-class one at 64 px (8x8): the
    classifiers keep their init, the position embedding is what timm's own weight adaptation
    makes of it, every other tensor is the checkpoint's."""
    torch.manual_seed(0)
    src = tiny(num_classes=5, model=model, img_size=32, **extra)
    path = tmp_path / "src.pth"
    torch.save({"model": src.state_dict(), "epoch": 3}, path)  # the public format
    torch.manual_seed(1)
    dst = tiny(model=model, **extra)
    init = {k: v.clone() for k, v in dst.state_dict().items()}
    notes = train_cli.load_finetune(dst, str(path))
    heads = train_cli._classifier_keys(dst)
    assert heads == ([f"{h}.{p}" for h in ("head", "head_dist") for p in ("weight", "bias")] if "distilled" in model
                     else ["head.weight", "head.bias"])
    assert len(notes) == 2 and "head.weight (5, 32) -> (3, 32)" in notes[0] and "4x4 to the model's 8x8" in notes[1]
    from timm.models.vision_transformer import checkpoint_filter_fn

    expected = checkpoint_filter_fn(src.state_dict(), dst)["pos_embed"]
    got, want = dst.state_dict(), src.state_dict()
    assert got["pos_embed"].shape == init["pos_embed"].shape
    torch.testing.assert_close(got["pos_embed"], expected, rtol=0, atol=0)
    for name, value in got.items():
        if name in heads:
            assert torch.equal(value, init[name]), name
        elif name != "pos_embed":
            assert torch.equal(value, want[name]), name


def test_finetune_of_matching_or_headless_weights(tmp_path):
    """Weights that fit load as they are (nothing to say); weights without a classifier (a
    feature extractor) leave it at its init, and say so."""
    src = tiny()
    path = tmp_path / "same.pth"
    torch.save(src.state_dict(), path)
    dst = tiny()
    assert train_cli.load_finetune(dst, str(path)) == []
    assert_same(dst.state_dict(), src.state_dict())
    headless = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    torch.save({"model": headless}, path)
    dst = tiny()
    init = dst.head.weight.clone()
    assert train_cli.load_finetune(dst, str(path)) == [
        "the checkpoint has no head.weight, head.bias: initialised at random and trained from scratch"]
    assert torch.equal(dst.head.weight, init)
    assert torch.equal(dst.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)
    from safetensors.torch import save_file  # timm's hub format

    save_file(tiny(num_classes=7).state_dict(), str(tmp_path / "hub.safetensors"))
    dst = tiny()
    assert "head.weight (7, 32) -> (3, 32)" in train_cli.load_finetune(dst, str(tmp_path / "hub.safetensors"))[0]
    (tmp_path / "bad.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(train_cli.UsageError, match="--finetune: cannot read"):
        train_cli.load_finetune(tiny(), str(tmp_path / "bad.safetensors"))


def test_finetune_run_from_another_dataset_and_size(data, tmp_path, capsys):
    """mctf-train --finetune from a 1000-class 32 px model: the run says what it adapted, logs it,
    trains, and its checkpoint is the 3-class 64 px model's."""
    src = tmp_path / "imagenet32.pth"
    torch.save({"model": tiny(num_classes=1000, img_size=32).state_dict()}, src)
    out = tmp_path / "out"
    err = train(BASE + ["--data-path", data, "-b", "8", "--epochs", "1", "--output", out, "--finetune", src],
                capsys).err
    assert f"mctf-train: --finetune {src}: dropped the checkpoint's classifier (head.weight (1000, 32) -> (3, 32)" \
        in err and "resampled the position embedding from a 4x4 to the model's 8x8 patch grid" in err, err
    log = read_log(out)
    assert len(log[0]["finetune"]) == 2 and log[0]["args"]["finetune"] == str(src)
    assert [r["event"] for r in log] == ["start", "epoch", "end"]
    mctf.load_checkpoint(tiny(), str(out / "checkpoint.pth"))  # strictly: the 3-class 64 px model


def test_adaptive_clipping_leaves_the_classifiers_out():
    """--clip-mode agc clips every parameter but the classifiers' (timm's train.py), the other
    modes all of them."""
    for model, heads in ((tiny(), 2), (tiny(model="deit_tiny_distilled_patch16_224"), 4)):
        every = list(model.parameters())
        assert train_cli.clip_parameters(model, "norm") == every
        kept = train_cli.clip_parameters(model, "agc")
        assert len(kept) == len(every) - heads
        head_ids = {id(p) for n, p in model.named_parameters() if n.startswith("head")}
        assert len(head_ids) == heads and not head_ids & {id(p) for p in kept}
