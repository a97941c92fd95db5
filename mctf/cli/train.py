"""mctf-train: fine-tune a timm ViT with MCTF, the paper's recipe on timm's building blocks.

Every step runs a student pass at the configured r and a teacher pass at a random smaller
r through the same weights, plus a consistency loss between their class tokens
(mctf.training.finetune_loss). Data, optimizer, schedule, EMA and loss scaling are
timm's own (create_transform, Mixup, create_optimizer_v2, create_scheduler_v2,
ModelEmaV3, NativeScaler, its loss classes); the defaults are the public fine-tuning
command's (docs/training.md). After every epoch the model (and its EMA) is evaluated
with mctf-eval's evaluation loop and a checkpoint is written in the public format
(loadable by mctf.load_checkpoint and mctf-eval); --resume continues from it exactly.

Reproducibility: every sample's augmentation draws from seeds derived from (--seed,
epoch, image, copy), every epoch reseeds the step randomness (drop path, mixup) from
(--seed, epoch, rank), and the teacher's r comes from a host generator seeded with
(--seed, epoch), the same on every rank. So a resumed run repeats the uninterrupted one
bit for bit on CPU, and N processes see the same images in the same global batches as
one process with N times the batch.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

from mctf.cli import common
from mctf.cli.common import UsageError, cli_errors, log

PROG = "mctf-train"
CHECKPOINT = "checkpoint.pth"
EMA_CHECKPOINT = "model_ema.pth"
LOG = "log.jsonl"
AMP_DTYPES = {"float16": "fp16", "bfloat16": "bf16"}  # our names -> mctf-eval's
# settings whose change on --resume makes the continued run differ from the saved one's plan
RESUME_KEYS = ("model", "model_kwargs", "mctf_type_resolved", "activate_layer_resolved", "task_type", "task_weight",
               "batch_size", "world_size", "lr_scaled", "min_lr_scaled", "sched", "epochs", "cooldown_epochs",
               "opt", "weight_decay", "seed", "aug_repeats", "mixup", "cutmix", "smoothing", "drop_path", "amp",
               "amp_dtype", "model_ema_decay")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=common.HelpFormatter,
        epilog="Several GPUs: torchrun --nproc_per_node N -m mctf.cli.train ... (-b is per process; the lr "
               "scales with the global batch; write --student-r for --r, which torchrun's parser takes for its "
               "own). The public script's spellings are accepted too: --mctf_type [16,8,0,1,1,1,20,40,1,1,0], "
               "--activate_layer [1,2,3], --task_type [1,1,0.4], --lr_times ... Recipe, the public command "
               "translated and costs: docs/training.md")
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", default="deit_small_patch16_224", help="timm model name")
    g.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights (downloads them)")
    g.add_argument("--initial-checkpoint", help="start from these weights (the public MCTF format or a plain "
                                                "state_dict, loaded strictly); default: none")
    g.add_argument("--finetune", metavar="PATH",
                   help="start from these weights (a torch file as --initial-checkpoint takes, or .safetensors) "
                        "adapted to the model, as the public --finetune: a classifier of another shape is dropped "
                        "(trained from scratch), the absolute position embedding is resampled to the model's patch "
                        "grid (timm's resample_abs_pos_embed); anything else must match. For weights of another "
                        "dataset (classes) or image size; default: none")
    g.add_argument("--resume", help="continue a run from its checkpoint.pth (weights, optimizer, schedule, loss "
                                    "scaler, EMA, epoch); default: none")
    g.add_argument("--num-classes", type=int, help="classifier outputs; default: the number of train class folders")
    common.add_model_kwargs_argument(g)
    g.add_argument("--drop", type=float, default=0.0, help="dropout rate")
    g.add_argument("--drop-path", type=float, default=0.1, help="drop path (stochastic depth) rate")

    g = p.add_argument_group("MCTF")
    g.add_argument("--preset", choices=("mctf", "mctf-fast"), default=None,
                   help="mctf: r=16 on blocks 1..depth-1; mctf-fast: r=0.35 on every (depth//4)-th block; "
                        "default: mctf (with the teacher's r_max = r / 2, as the public recipe)")
    g.add_argument("--mctf-type", "--mctf_type", nargs="+", metavar="V",
                   help="the public code's --mctf_type list, 11 numbers (r r_teacher_max trace_source prop_attn "
                        "one_step_ahead tau_sim tau_info tau_size bidirection pooling_type 0); replaces --preset; "
                        "default: none")
    g.add_argument("--activate-layer", "--activate_layer", nargs="+", type=int, metavar="I",
                   help="0-based blocks where fusion runs; default: the preset's, or every block with --mctf-type")
    g.add_argument("--r", "--student-r", dest="r",
                   help="the student's r (replaces the configuration's; under torchrun write --student-r); "
                        "default: the configuration's")
    g.add_argument("--r-teacher-max", help="the teacher draws r in [0, this) every step; default: the "
                                           "configuration's, r / 2 for a preset")
    g.add_argument("--task-type", "--task_type", nargs=3, type=float, default=[1, 1, 0.4], metavar=("S", "T", "C"),
                   help="student loss on/off, teacher loss on/off, consistency threshold (0 = off)")
    g.add_argument("--task-weight", "--task_weight", nargs=3, type=float, default=[1.0, 1.0, 3.0],
                   metavar=("WS", "WT", "WC"),
                   help="weights of the student, teacher and consistency losses")
    g.add_argument("--backend", choices=common.BACKENDS,
                   help=f"mctf_kernels backend; default: ${common.BACKEND_ENV}, else auto")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", "--data_path", required=True,
                   help="root holding <train-split>/ and <val-split>/ ImageFolders (<split>/<class>/<image>), "
                        "as ImageNet (required)")
    g.add_argument("--train-split", default="train", help="train folder under --data-path")
    g.add_argument("--val-split", default="val", help="validation folder under --data-path")
    g.add_argument("-b", "--batch-size", type=int, default=128, help="images per step and process")
    g.add_argument("-vb", "--validation-batch-size", type=int, help="default: 3 x --batch-size")
    g.add_argument("-j", "--workers", type=int, default=common.default_workers(),
                   help="data loader worker processes (min(8, CPUs available))")
    g.add_argument("--crop-pct", type=float, help=f"validation center-crop ratio; default: {common.DEFAULT_CROP_PCT}")

    g = p.add_argument_group("augmentation and regularisation (timm's)")
    g.add_argument("--no-aug", action="store_true", help="no train augmentation (resize and center crop only)")
    g.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0], metavar=("MIN", "MAX"),
                   help="random-resized-crop area range")
    g.add_argument("--ratio", type=float, nargs=2, default=[3 / 4, 4 / 3], metavar=("MIN", "MAX"),
                   help="random-resized-crop aspect range")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--color-jitter", type=float, default=0.3, help="color jitter (timm disables it with --aa)")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="auto-augment policy; 'none' for none")
    g.add_argument("--train-interpolation", default="bicubic", help="train resize interpolation")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--remode", default="pixel", choices=("pixel", "rand", "const"), help="random erasing mode")
    g.add_argument("--recount", type=int, default=1, help="random erasing count")
    g.add_argument("--aug-repeats", type=int, default=3,
                   help="repeated augmentation: copies of each image per epoch, on different ranks (1 = off)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (on if > 0)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (on if > 0)")
    g.add_argument("--cutmix-minmax", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="cutmix area ratio range (turns cutmix on); default: none")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix when both are on")
    g.add_argument("--mixup-mode", choices=("batch", "pair", "elem"), default="batch", help="mixup granularity")

    g = p.add_argument_group("optimizer and schedule (timm's)")
    g.add_argument("--opt", default="adamw", help="timm optimizer name")
    g.add_argument("--opt-eps", type=float, default=1e-8, help="optimizer epsilon")
    g.add_argument("--opt-betas", type=float, nargs="+", help="optimizer betas; default: the optimizer's")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=0.05, help="weight decay")
    g.add_argument("--clip-grad", type=float, help="clip gradients at this norm (or value); default: none")
    g.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"), help="gradient clipping mode")
    g.add_argument("--lr", type=float, default=5e-4,
                   help="base lr at a global batch of --lr-base-size; the lr used is "
                        "lr x batch x world_size / lr_base_size x lr_times")
    g.add_argument("--lr-base-size", type=int, default=512, help="global batch that --lr refers to")
    g.add_argument("--lr-times", "--lr_times", type=float, default=0.03,
                   help="lr multiplier (the public fine-tuning recipe's)")
    g.add_argument("--min-lr-times", "--min_lr_times", type=float, default=0.1,
                   help="multiplier of --min-lr and --warmup-lr")
    g.add_argument("--min-lr", type=float, default=1e-5, help="lower lr bound (before --min-lr-times)")
    g.add_argument("--warmup-lr", type=float, default=1e-6, help="warmup start lr (before --min-lr-times)")
    g.add_argument("--sched", default="cosine", help="timm scheduler name")
    g.add_argument("--sched-on-updates", action="store_true", help="step the schedule every update, not epoch")
    g.add_argument("--epochs", type=int, default=30, help="epochs of the schedule (timm adds --cooldown-epochs)")
    g.add_argument("--warmup-epochs", type=int, default=0, help="lr warmup epochs")
    g.add_argument("--cooldown-epochs", type=int, default=10, help="epochs at min lr after the schedule")
    g.add_argument("--decay-epochs", type=float, default=30, help="epochs between decays (step schedules)")
    g.add_argument("--decay-rate", type=float, default=0.1, help="lr decay rate (step schedules)")
    g.add_argument("--patience-epochs", type=int, default=10, help="patience of the plateau schedule")
    g.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=True,
                   help="keep an exponential moving average of the weights (saved and evaluated)")
    g.add_argument("--model-ema-decay", type=float, default=0.99996, help="EMA decay per update")
    g.add_argument("--model-ema-warmup", action="store_true", help="EMA decay warmup (timm's ModelEmaV3)")

    g = p.add_argument_group("run")
    g.add_argument("--amp", action="store_true", help="mixed precision (torch.amp autocast; a loss scaler for fp16)")
    g.add_argument("--amp-dtype", choices=tuple(AMP_DTYPES), default="float16", help="autocast dtype with --amp")
    g.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda ...")
    g.add_argument("--seed", type=int, default=0, help="seed of the init, the augmentation and the teacher's r")
    g.add_argument("--output", "--output_dir", help="run folder (checkpoint.pth, model_ema.pth, log.jsonl); default: "
                                    "output/<model>, or the folder of --resume")
    g.add_argument("--save-every", type=int,
                   help="also keep checkpoint-<epoch>.pth (resumable) every this many epochs; default: only the last")
    g.add_argument("--log-interval", type=int, default=50,
                   help="steps between progress updates (each reads the loss back from the device)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# ---------------------------------------------------------------------------
# checks that need neither torch nor timm


def _number(text: str, option: str):
    try:
        return common.parse_number(str(text))
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not a number") from None


def check_args(args) -> Dict:
    """Usage errors found from the arguments and the file system alone; nothing is written."""
    for name in ("batch_size", "epochs", "log_interval", "lr_base_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.save_every is not None and args.save_every < 1:
        raise UsageError("--save-every must be >= 1")
    if args.validation_batch_size is not None and args.validation_batch_size < 1:
        raise UsageError("--validation-batch-size must be >= 1")
    if args.aug_repeats < 1:
        raise UsageError("--aug-repeats must be >= 1 (1: no repeated augmentation)")
    for name in ("workers", "warmup_epochs", "cooldown_epochs", "drop", "drop_path", "smoothing", "mixup",
                 "cutmix", "reprob", "lr", "min_lr", "warmup_lr", "weight_decay", "lr_times", "min_lr_times"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0")
    for name in ("drop", "drop_path", "reprob", "hflip", "mixup_prob", "mixup_switch_prob"):
        if not 0 <= getattr(args, name) <= 1:
            raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1]")
    if not 0 <= args.model_ema_decay <= 1:
        raise UsageError("--model-ema-decay must be in [0, 1]")
    if args.clip_grad is not None and not (math.isfinite(args.clip_grad) and args.clip_grad > 0):
        raise UsageError("--clip-grad must be a finite number > 0")
    if args.smoothing >= 1:
        raise UsageError("--smoothing must be in [0, 1)")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise UsageError("--crop-pct must be in (0, 1]")
    if not all(math.isfinite(v) and v >= 0 for v in args.task_weight):
        raise UsageError("--task-weight: weights must be finite numbers >= 0")
    student, teacher, threshold = args.task_type
    if not 0 <= threshold < 1:
        raise UsageError("--task-type: the consistency threshold (third value) must be in [0, 1)")
    if not (student or teacher or threshold):
        raise UsageError("--task-type 0 0 0 trains nothing: turn on the student, the teacher or the consistency")
    mixup = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixup and args.batch_size % 2:
        raise UsageError(f"--batch-size {args.batch_size}: mixup/cutmix pair every image with another of its "
                         f"batch, so the batch per process must be even")
    r = common.parse_r_values([args.r], "--r")[0] if args.r is not None else None
    r_teacher_max = (common.parse_r_values([args.r_teacher_max], "--r-teacher-max")[0]
                     if args.r_teacher_max is not None else None)
    if args.mctf_type is not None:
        if args.preset is not None:
            raise UsageError("give either --preset or --mctf-type, not both")
        values = [_number(v, "--mctf-type") for v in args.mctf_type]
        if len(values) not in (10, 11):
            raise UsageError(f"--mctf-type takes 11 numbers, got {len(values)}")
        common.parse_r_values([values[0]], "--mctf-type r (first value)")
        common.parse_r_values([values[1]], "--mctf-type r_teacher_max (second value)")
        args.mctf_type = [str(v) for v in values]
    # the data layout, before anything heavy (the common typo)
    from mctf.cli.eval import check_folder

    splits = {}
    for split in (args.train_split, args.val_split):
        path = os.path.join(args.data_path, split)
        if not os.path.isdir(args.data_path):
            raise UsageError(f"--data-path: no such directory: {args.data_path}")
        if not os.path.isdir(path):
            raise UsageError(f"--data-path: {args.data_path} has no {split}/ folder (expected "
                             f"{args.data_path}/{args.train_split}/<class>/<image> and "
                             f"{args.data_path}/{args.val_split}/<class>/<image>)")
        splits[split] = check_folder(path)
    if splits[args.train_split] != splits[args.val_split]:
        only_train = sorted(set(splits[args.train_split]) - set(splits[args.val_split]))
        only_val = sorted(set(splits[args.val_split]) - set(splits[args.train_split]))
        raise UsageError(f"--data-path: {args.train_split}/ and {args.val_split}/ must hold the same class folders "
                         f"(class i is the i-th name in sorted order); only in {args.train_split}: "
                         f"{only_train[:5]}, only in {args.val_split}: {only_val[:5]}")
    for option in ("initial_checkpoint", "finetune", "resume"):
        path = getattr(args, option)
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"--{option.replace('_', '-')}: no such file: {path}")
    starts = [o for o, v in (("--pretrained", args.pretrained), ("--initial-checkpoint", args.initial_checkpoint),
                             ("--finetune", args.finetune), ("--resume", args.resume)) if v]
    if len(starts) > 1:
        raise UsageError(f"give one start, not {' and '.join(starts)}: --pretrained (timm's weights), "
                         f"--initial-checkpoint (a file, loaded strictly), --finetune (a file, classifier and "
                         f"position embedding adapted) or --resume (continue a run)")
    output = args.output or (os.path.dirname(os.path.abspath(args.resume)) if args.resume
                             else os.path.join("output", args.model))
    existing = os.path.join(output, CHECKPOINT)
    # resuming a run in its own folder (from its last or an earlier kept checkpoint) continues it there
    own_run = bool(args.resume) and os.path.isdir(output) and os.path.samefile(
        os.path.dirname(os.path.abspath(args.resume)), output)
    if os.path.exists(existing) and not own_run:
        raise UsageError(f"--output: {output} already holds a run ({CHECKPOINT}); continue it with --resume "
                         f"{existing} or choose another --output")
    if os.path.exists(output) and not os.path.isdir(output):
        raise UsageError(f"--output: {output} is not a directory")
    return dict(r=r, r_teacher_max=r_teacher_max, classes=splits[args.train_split], mixup=mixup, output=output,
                model_kwargs=common.parse_model_kwargs(args.model_kwargs),
                backend=args.backend or common.backend_from_env())


def build_config(args, parsed: Dict, depth: int):
    """The MCTF configuration to train: --preset / --mctf-type / --activate-layer, then --r and
    --r-teacher-max."""
    ns = argparse.Namespace(mctf_type=args.mctf_type, preset=args.preset, activate_layer=args.activate_layer, r=None)
    config = common.build_config(ns, depth)
    try:
        if parsed["r"] is not None:
            config = config.replace(r=parsed["r"])
        if parsed["r_teacher_max"] is not None:
            config = config.replace(r_teacher_max=parsed["r_teacher_max"])
        elif args.mctf_type is None:  # the public recipe's teacher: [16, 8, ...]
            config = config.replace(r_teacher_max=config.r // 2 if isinstance(config.r, int) else config.r / 2)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return config


def _posterize(img, bits_to_keep, **kwargs):
    """timm's posterize with 0 bits kept giving what Pillow gave when the public recipe ran
    (every channel value masked to 0: a black image); newer Pillow (13 here) raises instead.
    RandAugment's ``inc1`` posterize keeps 0 bits at magnitude 10, which the recipe's m9 with
    mstd0.5 draws (clipped) about 2% of the time: the run would crash at a random step."""
    from PIL import Image
    from timm.data import auto_augment

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def keep_zero_bit_posterize(transform):
    """Route the RandAugment/AutoAugment posterize ops in ``transform`` through _posterize."""
    from timm.data.auto_augment import AugmentOp

    stack = [transform]
    while stack:
        t = stack.pop()
        if isinstance(t, (list, tuple)):  # AutoAugment's policy: a list of sub-policies
            stack.extend(t)
            continue
        if isinstance(t, AugmentOp) and t.name.startswith("Posterize"):
            t.aug_fn = _posterize
        for attr in ("transforms", "ops", "policy"):
            children = getattr(t, attr, None)
            if isinstance(children, (list, tuple)):
                stack.extend(children)
    return transform


# ---------------------------------------------------------------------------
# reproducible randomness


def derive_seed(*parts) -> int:
    """A 63-bit seed from ``parts``: unrelated streams for every (seed, epoch, index/rank)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededSamples:
    """A dataset whose samples are augmented from seeds derived from (seed, epoch, image, copy),
    whichever process or worker loads them, so runs repeat across resumes and world sizes.
    It is indexed by ``image * repeats + copy`` (RepeatedAugmentSampler): the copies of one
    image in an epoch are augmented differently."""

    def __init__(self, dataset, seed: int, repeats: int = 1):
        self.dataset, self.seed, self.repeats, self.epoch = dataset, seed, repeats, 0

    def __len__(self):
        return len(self.dataset) * self.repeats

    def __getitem__(self, code):
        import random

        import numpy as np
        import torch

        index, copy = divmod(code, self.repeats)
        s = derive_seed(self.seed, "sample", self.epoch, index, copy)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):  # the caller's torch stream is left as it was
            random.seed(s)
            np.random.seed(s % 2 ** 32)
            torch.manual_seed(s)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class RepeatedAugmentSampler:
    """Repeated augmentation (DeiT's sampler, which the public fine-tuning uses): every epoch
    shuffles the images (seeded by (seed, epoch)), repeats each ``repeats`` times in a row,
    and deals the list round-robin to the ranks, so an image's copies land on different
    ranks (or, on one process, in one batch). Each rank keeps ``per_rank`` samples:
    ``len(images)`` over the world size, so an epoch holds as many samples as there are
    images; with repeats, rounded down to a multiple of 256 first (all of them below 256),
    as DeiT's sampler does. Without repeats nothing is rounded: a dataset of 500 images
    would otherwise train on 256 of them per epoch. The global list is the
    same for any world size: N processes see exactly the global batches one process sees.
    Yields ``image * repeats + copy`` (SeededSamples)."""

    def __init__(self, num_images: int, world: int, rank: int, repeats: int, seed: int, round_to: int = 256):
        self.num_images, self.world, self.rank, self.repeats, self.seed = num_images, world, rank, repeats, seed
        kept = num_images // round_to * round_to if num_images >= round_to and repeats > 1 else num_images
        self.per_rank = kept // world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.per_rank

    def __iter__(self):
        import torch

        g = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
        perm = torch.randperm(self.num_images, generator=g)
        codes = (perm[:, None] * self.repeats + torch.arange(self.repeats)).flatten()
        return iter(codes[self.rank::self.world][:self.per_rank].tolist())


def seed_epoch(seed: int, epoch: int, rank: int):
    """Reseed the step randomness (drop path, dropout, mixup) for ``epoch`` on ``rank``; return the
    teacher's r generator, seeded alike on every rank."""
    import random

    import numpy as np
    import torch

    s = derive_seed(seed, "step", epoch, rank)
    torch.manual_seed(s)
    np.random.seed(s % 2 ** 32)
    random.seed(s)
    return torch.Generator().manual_seed(derive_seed(seed, "teacher", epoch))


# ---------------------------------------------------------------------------
# the step


def _step_module(model, task_type, task_weight, criterion):
    """One module whose forward is the whole fine-tuning loss, so DistributedDataParallel sees one
    forward per backward (both passes run inside it) and reduces the gradients once."""
    import torch

    from mctf.training import finetune_loss

    class FinetuneStep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, images, targets, classes, r_teacher: Optional[float]):
            out = finetune_loss(self.model, images, targets, task_type=task_type, task_weight=task_weight,
                                criterion=criterion, r_teacher=r_teacher, confidence_classes=classes)
            return out.loss, out.loss_student, out.loss_teacher, out.loss_consistency

    return FinetuneStep()


def autocast(device, amp_dtype: Optional[str]):
    import torch

    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, amp_dtype))


def train_one_epoch(ctx, epoch: int, progress: bool) -> Dict:
    """One pass over this rank's shard; returns the epoch's mean losses over all ranks."""
    import torch

    from mctf.cli.eval import all_reduce
    from mctf.training import sample_teacher_r

    model, step, loader, device = ctx["model"], ctx["step"], ctx["loader"], ctx["device"]
    optimizer, scheduler, scaler, ema, args = ctx["optimizer"], ctx["scheduler"], ctx["scaler"], ctx["ema"], ctx["args"]
    generator = seed_epoch(args.seed, epoch, ctx["rank"])
    loader.sampler.set_epoch(epoch)
    loader.dataset.epoch = epoch
    r_teacher_max = ctx["config"].r_teacher_max
    teacher_needed = bool(args.task_type[1] or args.task_type[2])
    model.train()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, student, teacher, consistency
    steps = len(loader)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=f"epoch {epoch}", unit="step", file=sys.stderr, dynamic_ncols=True)
    start = time.perf_counter()
    for i, (images, labels) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        targets, classes = labels, labels[:, None]
        if ctx["mixup"] is not None:
            # every timm mixup mode mixes sample i with sample B-1-i: confidence sums both labels
            images, targets = ctx["mixup"](images, labels)
            classes = torch.stack([labels, labels.flip(0)], dim=1)
        # drawn on the host from a generator seeded alike on every rank: no device sync, same shapes everywhere
        r_teacher = sample_teacher_r(r_teacher_max, generator) if teacher_needed else None
        with autocast(device, ctx["amp_dtype"]):
            losses = step(images, targets, classes, r_teacher)
        loss = losses[0]
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                   parameters=ctx["clip_parameters"])
        else:
            loss.backward()
            if args.clip_grad is not None:
                from timm.utils import dispatch_clip_grad

                dispatch_clip_grad(ctx["clip_parameters"], args.clip_grad, mode=args.clip_mode)
            optimizer.step()
        ctx["updates"] += 1
        if ema is not None:
            ema.update(model, step=ctx["updates"])
        scheduler.step_update(num_updates=ctx["updates"])
        sums += torch.stack([x.detach().to(torch.float64) for x in losses])
        if (i + 1) % args.log_interval == 0 or i + 1 == steps:
            # the only host sync, every --log-interval steps; averaged over the ranks so that
            # all of them see a non-finite loss at the same step and stop together
            mean = [v / ctx["world"] for v in all_reduce((sums / (i + 1)).tolist(), device, ctx["world"])]
            if not math.isfinite(mean[0]):
                raise FloatingPointError(f"loss is {mean[0]} at epoch {epoch}, step {i}: stopping")
            if bar is not None:
                bar.set_postfix(loss=f"{mean[0]:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    # the last step always logs: mean is the epoch's, over all ranks
    return dict(train_loss=mean[0], loss_student=mean[1], loss_teacher=mean[2], loss_consistency=mean[3],
                steps=steps, train_seconds=seconds,
                train_images_per_s=steps * args.batch_size * ctx["world"] / seconds if seconds > 0 else None)


def run_eval(ctx, module, desc: str, progress: bool) -> Dict:
    """mctf-eval's evaluation loop over the validation shards, summed over ranks."""
    from mctf.cli.eval import all_reduce, evaluate

    module.eval()
    sums = evaluate(module, ctx["val_loader"], ctx["device"], AMP_DTYPES.get(ctx["amp_dtype"]), ctx["topk"],
                    progress=progress, desc=desc)
    c1, ck, loss, n = all_reduce([sums["correct1"], sums["correctk"], sums["loss_sum"], sums["count"]],
                                 ctx["device"], ctx["world"])
    return dict(top1=100.0 * c1 / n, topk=100.0 * ck / n, loss=loss / n, num_images=int(n))


# ---------------------------------------------------------------------------
# checkpoints


def _torch_load(path):
    import torch

    from mctf.checkpoint import SAFE_GLOBALS

    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"--resume: cannot read {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None


def save_checkpoint(ctx, epoch: int) -> None:
    """The public script's format ({'model', 'optimizer', 'lr_scheduler', 'epoch', 'scaler', 'args'},
    the EMA under 'state_dict_ema'), written atomically; the EMA weights also alone in
    model_ema.pth ({'model': ema, ...}) for mctf-eval."""
    payload = dict(model=ctx["model"].state_dict(), optimizer=ctx["optimizer"].state_dict(),
                   lr_scheduler=ctx["scheduler"].state_dict(), epoch=epoch,
                   scaler=None if ctx["scaler"] is None else ctx["scaler"].state_dict(),
                   args=argparse.Namespace(**ctx["saved_args"]))
    if ctx["ema"] is not None:
        payload["state_dict_ema"] = ctx["ema"].module.state_dict()
    _atomic_save(payload, os.path.join(ctx["output"], CHECKPOINT))
    every = ctx["args"].save_every
    if every and epoch % every == 0:
        _atomic_save(payload, os.path.join(ctx["output"], f"checkpoint-{epoch}.pth"))
    if ctx["ema"] is not None:
        _atomic_save(dict(model=payload["state_dict_ema"], epoch=epoch, args=payload["args"]),
                     os.path.join(ctx["output"], EMA_CHECKPOINT))


def _atomic_save(obj, path: str) -> None:
    import torch

    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint


def load_resume(ctx, path: str) -> int:
    """Restore weights, optimizer, schedule, scaler, EMA; return the next epoch and the saved
    run's arguments."""
    import mctf

    obj = _torch_load(path)
    missing = [k for k in ("model", "optimizer", "lr_scheduler", "epoch") if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise UsageError(f"--resume: {path} is not an mctf-train checkpoint (no {', '.join(missing)}); start a new "
                         f"run from it with --initial-checkpoint")
    try:
        mctf.load_checkpoint(ctx["model"], path)
    except mctf.CheckpointMismatchError as exc:
        raise UsageError(f"--resume: {exc}") from None
    if ctx["ema"] is not None:
        if "state_dict_ema" not in obj:
            raise UsageError(f"--resume: {path} holds no EMA weights; resume with --no-model-ema")
        ctx["ema"].module.load_state_dict(obj["state_dict_ema"])
    try:
        ctx["optimizer"].load_state_dict(obj["optimizer"])
    except (ValueError, KeyError) as exc:
        raise UsageError(f"--resume: the optimizer state does not fit --opt {ctx['args'].opt}: {exc}") from None
    ctx["scheduler"].load_state_dict(obj["lr_scheduler"])
    if ctx["scaler"] is not None:
        if obj.get("scaler") is None:
            raise UsageError(f"--resume: {path} was saved without a loss scaler (no fp16 --amp)")
        ctx["scaler"].load_state_dict(obj["scaler"])
    saved = obj.get("args")
    return int(obj["epoch"]) + 1, vars(saved) if isinstance(saved, argparse.Namespace) else {}


def _classifier_keys(model) -> List[str]:
    """The state_dict keys of the model's classifier(s) (timm's pretrained_cfg names them:
    ``head``, or ``head`` and ``head_dist`` for the distilled DeiTs)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    names = (names,) if isinstance(names, str) else tuple(names)
    return [k for k in model.state_dict() if any(k.startswith(n + ".") for n in names)]


def clip_parameters(model, mode: str) -> list:
    """The parameters --clip-grad clips: all, but for adaptive clipping (agc) the classifier's,
    as timm's train.py leaves them out (named here, where timm drops the last two)."""
    if mode != "agc":
        return list(model.parameters())
    head = set(_classifier_keys(model))
    return [p for name, p in model.named_parameters() if name not in head]


def load_finetune(model, path: str) -> List[str]:
    """Load ``path`` into the unpatched timm ``model`` as the public fine-tuning does: a
    classifier whose shapes differ (or that the file lacks) is left at its random init, the
    absolute position embedding is resampled to the model's patch grid with timm's
    ``resample_abs_pos_embed`` (bicubic, antialiased, as timm adapts its own weights); any other
    missing, unexpected or differently shaped key is a UsageError naming them. Returns what was
    adapted, one sentence each."""
    from timm.layers import resample_abs_pos_embed

    from mctf.checkpoint import CheckpointLoadError, CheckpointMismatchError, _extract_state_dict, _load

    if path.endswith(".safetensors"):  # timm's hub weights come this way (tensors only, nothing to unpickle)
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise UsageError(f"--finetune: cannot read {path}: {exc}") from None
    else:
        try:
            state = dict(_extract_state_dict(_load(path, "cpu"), path))
        except (CheckpointLoadError, CheckpointMismatchError) as exc:
            raise UsageError(f"--finetune: {exc}") from None
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    own = model.state_dict()
    notes = []

    head = _classifier_keys(model)
    dropped = [k for k in head if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    absent = [k for k in head if k not in state]
    if dropped:
        shapes = ", ".join(f"{k} {tuple(state[k].shape)} -> {tuple(own[k].shape)}" for k in dropped)
        notes.append(f"dropped the checkpoint's classifier ({shapes}): initialised at random and trained from "
                     f"scratch")
        for k in dropped:
            del state[k]
    if absent:
        notes.append(f"the checkpoint has no {', '.join(absent)}: initialised at random and trained from scratch")

    pos, own_pos = state.get("pos_embed"), own.get("pos_embed")
    # another token count at the same width: resampled; another width falls to the mismatch list below
    if (pos is not None and own_pos is not None and pos.dim() == 3 and pos.shape[0] == 1
            and pos.shape[2] == own_pos.shape[2] and pos.shape[1] != own_pos.shape[1]):
        # the tokens with a position embedding of their own: timm's rule (no_embed_class models
        # embed the patches only)
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        grid = tuple(model.patch_embed.grid_size)
        side = math.isqrt(max(pos.shape[1] - prefix, 0))
        if side == 0 or side * side != pos.shape[1] - prefix:
            raise UsageError(f"--finetune: {path}: pos_embed {tuple(pos.shape)} is not {prefix} prefix token(s) "
                             f"and a square patch grid: it cannot be resampled to the model's "
                             f"{tuple(own_pos.shape)}")
        state["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(grid), old_size=[side, side],
                                                    num_prefix_tokens=prefix)
        notes.append(f"resampled the position embedding from a {side}x{side} to the model's {grid[0]}x{grid[1]} "
                     f"patch grid")

    missing = sorted(set(own) - set(state) - set(head))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        lines = [f"--finetune: {path} does not fit {type(model).__name__} beyond its classifier and position "
                 f"embedding:"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise UsageError("\n".join(lines))
    model.load_state_dict(state, strict=False)  # only the classifier keys named above may be absent
    return notes


# ---------------------------------------------------------------------------
# the run


def setup(args, parsed: Dict) -> Dict:
    """Every object of the run, on every rank; raises UsageError before anything is written."""
    import torch
    from timm.data import Mixup, create_transform
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, NativeScaler

    import mctf
    from mctf.cli.eval import build_dataset, shard_sampler, start_rank

    num_classes = args.num_classes if args.num_classes is not None else len(parsed["classes"])
    if num_classes < len(parsed["classes"]):
        raise UsageError(f"--num-classes {num_classes}: the data has {len(parsed['classes'])} classes")
    kwargs = dict(parsed["model_kwargs"], num_classes=num_classes, drop_rate=args.drop,
                  drop_path_rate=args.drop_path)
    device = common.resolve_device(args.device) if args.device != "auto" else None
    common.check_supported(args.model, kwargs, lambda depth: build_config(args, parsed, depth))
    device, rank, world, local_rank = start_rank(device, args.device, parsed["backend"])

    torch.manual_seed(args.seed)  # the same random init on every rank
    try:
        model = common.create_model(args.model, kwargs, pretrained=args.pretrained,
                                    checkpoint=args.initial_checkpoint)
    except UsageError as exc:
        raise UsageError(str(exc).replace("--checkpoint", "--initial-checkpoint")) from None
    except Exception as exc:  # timm's weights unreachable (no network, no cache)
        if not args.pretrained:
            raise
        raise UsageError(f"--pretrained: cannot get timm's weights for {args.model}: "
                         f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                         f"(offline? start from --initial-checkpoint instead)") from None
    finetuned = load_finetune(model, args.finetune) if args.finetune else []
    config = build_config(args, parsed, len(model.blocks))
    model = common.patch_model(model, config).to(device)

    # data: timm's train transform, mctf-eval's folder checks and validation shards
    data_config = common.data_config_for(model, args.crop_pct)
    try:
        train_tf = keep_zero_bit_posterize(create_transform(
            input_size=data_config["input_size"], is_training=True, no_aug=args.no_aug, scale=tuple(args.scale),
            ratio=tuple(args.ratio), hflip=args.hflip, color_jitter=args.color_jitter,
            auto_augment=None if args.aa in ("none", "") else args.aa, interpolation=args.train_interpolation,
            mean=data_config["mean"], std=data_config["std"], re_prob=args.reprob, re_mode=args.remode,
            re_count=args.recount))
    except (AssertionError, KeyError, ValueError) as exc:  # timm's own checks of these names
        raise UsageError(f"timm cannot build the train augmentation from --aa {args.aa!r} and --train-interpolation "
                         f"{args.train_interpolation!r}: {exc.__class__.__name__}"
                         + (f": {exc}" if str(exc) else "")) from None
    train_root = os.path.join(args.data_path, args.train_split)
    images = build_dataset(train_root, train_tf)
    train_set = SeededSamples(images, args.seed, max(1, args.aug_repeats))
    val_set = build_dataset(os.path.join(args.data_path, args.val_split),
                            create_transform(**data_config, is_training=False))
    global_batch = args.batch_size * world
    # one global list dealt to the ranks, whole batches only: N processes see exactly the
    # global batches one process sees
    sampler = RepeatedAugmentSampler(len(images), world, rank, max(1, args.aug_repeats), args.seed)
    if len(sampler) < args.batch_size:
        raise UsageError(f"--batch-size {args.batch_size} x {world} process(es) = {global_batch} images per step, "
                         f"but {train_root} holds {len(images)}: not one full step per epoch")
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=args.validation_batch_size or 3 * args.batch_size,
        sampler=shard_sampler(len(val_set), rank, world), num_workers=args.workers,
        pin_memory=device.type == "cuda")

    mixup = None
    if parsed["mixup"]:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                      prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                      label_smoothing=args.smoothing, num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()  # smoothing is in the mixed targets
    elif args.smoothing:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    lr = args.lr * global_batch / args.lr_base_size * args.lr_times
    min_lr, warmup_lr = args.min_lr * args.min_lr_times, args.warmup_lr * args.min_lr_times
    opt_kwargs = dict(eps=args.opt_eps)
    if args.opt_betas:
        opt_kwargs["betas"] = tuple(args.opt_betas)
    try:
        optimizer = create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                        momentum=args.momentum, **opt_kwargs)
        scheduler, total_epochs = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            cooldown_epochs=args.cooldown_epochs, patience_epochs=args.patience_epochs, decay_rate=args.decay_rate,
            min_lr=min_lr, warmup_lr=warmup_lr, warmup_epochs=args.warmup_epochs,
            step_on_epochs=not args.sched_on_updates, updates_per_epoch=len(loader))
    except (ValueError, AssertionError, TypeError) as exc:
        raise UsageError(f"--opt {args.opt} / --sched {args.sched}: {exc}") from None
    if scheduler is None:
        raise UsageError(f"--sched {args.sched}: not a timm scheduler")
    amp_dtype = args.amp_dtype if args.amp else None
    scaler = NativeScaler(device=device.type) if amp_dtype == "float16" else None
    # timm: the EMA copies the model after it is on its device, before the DDP wrapper
    ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) if args.model_ema else None
    step = _step_module(model, tuple(args.task_type), tuple(args.task_weight), criterion)
    if world > 1:
        # the consistency term alone (--task-type 0 0 C) leaves the classifier without gradients:
        # DDP must look for unused parameters then (it leaves their grads None, as one process does)
        step = torch.nn.parallel.DistributedDataParallel(
            step, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=not (args.task_type[0] or args.task_type[1]))

    ctx = dict(args=args, model=model, step=step, config=config, device=device, rank=rank, world=world,
               loader=loader, val_loader=val_loader, mixup=mixup, optimizer=optimizer, scheduler=scheduler,
               scaler=scaler, ema=ema, amp_dtype=amp_dtype, total_epochs=total_epochs, updates=0,
               topk=min(5, num_classes), output=parsed["output"], lr=lr, data_config=data_config,
               num_classes=num_classes, train_images=len(images), val_images=len(val_set), finetuned=finetuned,
               clip_parameters=clip_parameters(model, args.clip_mode))
    ctx["saved_args"] = dict(vars(args), mctf_type_resolved=config.to_mctf_type(),
                             activate_layer_resolved=list(config.active_layers(len(model.blocks))),
                             num_classes_resolved=num_classes, world_size=world, lr_scaled=lr, min_lr_scaled=min_lr,
                             warmup_lr_scaled=warmup_lr, total_epochs=total_epochs)
    ctx["start_epoch"] = 0
    if args.resume:
        ctx["start_epoch"], before = load_resume(ctx, args.resume)
        if ctx["start_epoch"] >= total_epochs:
            raise UsageError(f"--resume: {args.resume} finished epoch {ctx['start_epoch'] - 1}, the last of "
                             f"{total_epochs}: nothing left to train")
        changed = [f"{k} {before[k]!r} -> {ctx['saved_args'][k]!r}" for k in RESUME_KEYS
                   if k in before and before[k] != ctx["saved_args"][k]]
        if changed and rank == 0:
            log(f"{PROG}: warning: resuming with other settings than the run was saved with ({'; '.join(changed)}); "
                f"the schedule and optimizer continue from their saved state")
        ctx["updates"] = ctx["start_epoch"] * len(loader)
        scheduler.step(ctx["start_epoch"])
        if args.sched_on_updates:
            scheduler.step_update(num_updates=ctx["updates"])
    return ctx


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def append_log(path: str, record: Dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(_jsonable(record)) + "\n")


def format_summary(rows: List[Dict], ema: bool, topk: int) -> str:
    header = (f"{'epoch':>5} {'lr':>9} {'loss':>8} {'student':>8} {'teacher':>8} {'consist':>8} "
              f"{'top-1':>7} {f'top-{topk}':>7}" + (f" {'EMA top-1':>9}" if ema else "") + f" {'img/s':>8}")
    lines = [header, "-" * len(header)]
    for row in rows:
        ips = row.get("train_images_per_s")
        lines.append(f"{row['epoch']:>5} {row['lr']:>9.3g} {row['train_loss']:>8.4f} {row['loss_student']:>8.4f} "
                     f"{row['loss_teacher']:>8.4f} {row['loss_consistency']:>8.4f} {row['top1']:>7.2f} "
                     f"{row['topk']:>7.2f}" + (f" {row['ema_top1']:>9.2f}" if ema else "")
                     + f" {('-' if ips is None else format(ips, '.1f')):>8}")
    return "\n".join(lines)


def train(args, parsed: Dict) -> Optional[Dict]:
    """The whole run; returns the summary on rank 0 (None elsewhere)."""
    import mctf

    ctx = setup(args, parsed)
    main_rank = ctx["rank"] == 0
    progress = main_rank and not args.no_progress
    output = ctx["output"]
    log_path = os.path.join(output, LOG)
    if main_rank:  # everything is checked: from here on the run writes
        os.makedirs(output, exist_ok=True)
        meta = common.run_metadata(ctx["device"])
        for note in ctx["finetuned"]:
            log(f"{PROG}: --finetune {args.finetune}: {note}")
        append_log(log_path, dict(event="start", args=ctx["saved_args"], start_epoch=ctx["start_epoch"],
                                  finetune=ctx["finetuned"],
                                  backend=mctf.get_backend(), data_config=ctx["data_config"],
                                  train_images=ctx["train_images"], val_images=ctx["val_images"], **meta))
        config = ctx["config"]
        log(f"{PROG}: {args.model} on {ctx['device']} x{ctx['world']}, {ctx['train_images']} train / "
            f"{ctx['val_images']} val images, {ctx['num_classes']} classes, batch {args.batch_size} x "
            f"{ctx['world']} ({len(ctx['loader'])} steps per epoch), lr {ctx['lr']:.3g}, "
            f"epochs {ctx['start_epoch']}..{ctx['total_epochs'] - 1}, "
            f"mctf_type={config.to_mctf_type()} layers={list(config.active_layers(len(ctx['model'].blocks)))}, "
            f"task_type={args.task_type} task_weight={args.task_weight}, backend={mctf.get_backend()}, "
            f"amp={ctx['amp_dtype'] or 'off'}, output {output}")
    rows = []
    for epoch in range(ctx["start_epoch"], ctx["total_epochs"]):
        lr = ctx["optimizer"].param_groups[0]["lr"]
        stats = train_one_epoch(ctx, epoch, progress)
        ev = run_eval(ctx, ctx["model"], f"eval {epoch}", progress)
        row = dict(epoch=epoch, lr=lr, **stats, **ev)
        if ctx["ema"] is not None:
            ema_ev = run_eval(ctx, ctx["ema"].module, f"eval EMA {epoch}", progress)
            row.update({f"ema_{k}": v for k, v in ema_ev.items() if k != "num_images"})
        ctx["scheduler"].step(epoch + 1, ev["top1"])
        if main_rank:
            save_checkpoint(ctx, epoch)
            append_log(log_path, dict(event="epoch", **row))
            log(f"{PROG}: epoch {epoch}: loss {row['train_loss']:.4f} (student {row['loss_student']:.4f}, teacher "
                f"{row['loss_teacher']:.4f}, consistency {row['loss_consistency']:.4f}), val top-1 {ev['top1']:.2f}"
                + (f", EMA top-1 {row['ema_top1']:.2f}" if ctx["ema"] is not None else "")
                + f", checkpoint {os.path.join(output, CHECKPOINT)}")
        rows.append(row)
    if not main_rank:
        return None
    best = max(rows, key=lambda r: r["top1"])
    summary = dict(epochs_run=len(rows), last=rows[-1], best_epoch=best["epoch"], best_top1=best["top1"],
                   checkpoint=os.path.join(output, CHECKPOINT),
                   ema_checkpoint=os.path.join(output, EMA_CHECKPOINT) if ctx["ema"] is not None else None)
    append_log(log_path, dict(event="end", **summary))
    print(format_summary(rows, ctx["ema"] is not None, ctx["topk"]))
    print(f"best top-1 {best['top1']:.2f} at epoch {best['epoch']}; last checkpoint {summary['checkpoint']}"
          + (f" (EMA weights alone: {summary['ema_checkpoint']})" if summary["ema_checkpoint"] else "")
          + f"; log {log_path}")
    return summary


def expand_lists(argv: List[str]) -> List[str]:
    """The public script's list values, ``[1,1,0.4]``, as separate values ``1 1 0.4``."""
    out = []
    for token in argv:
        if len(token) >= 2 and token[0] == "[" and token[-1] == "]" and "[" not in token[1:-1]:
            out.extend(v.strip() for v in token[1:-1].split(",") if v.strip())
        else:
            out.append(token)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(expand_lists(sys.argv[1:] if argv is None else list(argv)))
    with cli_errors(parser):
        try:
            train(args, check_args(args))
        except FloatingPointError as exc:  # a diverged run: the last checkpoint is the last good epoch
            log(f"{PROG}: {exc}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
