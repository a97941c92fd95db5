"""Fine-tuning with MCTF (README, "Fine-tuning"): a student pass at the configured r and a
teacher pass at a random smaller r through the same weights, with a consistency
loss between their final class tokens."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class FinetuneOutput:
    loss: torch.Tensor
    student_logits: torch.Tensor
    teacher_logits: Optional[torch.Tensor]
    loss_student: torch.Tensor
    loss_teacher: torch.Tensor
    loss_consistency: torch.Tensor
    r_teacher: Optional[float]


def sample_teacher_r(r_teacher_max: float, generator: Optional[torch.Generator] = None) -> float:
    """Teacher r as the public code draws it: an int in [0, r_max), or for a fractional
    r_max a multiple of 0.01 in [0, r_max)."""
    if r_teacher_max <= 0:
        return 0
    if r_teacher_max < 1:
        return int(torch.randint(0, int(r_teacher_max * 100), (1,), generator=generator)) / 100
    return int(torch.randint(0, int(r_teacher_max), (1,), generator=generator))


def _run(model, images: torch.Tensor, r) -> tuple:
    """Logits and the final (normed) class token for one pass at ``r``."""
    state = model.mctf_state
    state.r_override = r
    try:
        state.reset()
        features = model.forward_features(images)
        return model.forward_head(features), features[:, 0]
    finally:
        state.r_override = None


def finetune_loss(
    model,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    task_type: Sequence[float] = (1, 1, 0.4),
    task_weight: Sequence[float] = (1.0, 1.0, 3.0),
    criterion: Optional[Callable] = None,
    r_teacher: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    confidence_classes: Optional[torch.Tensor] = None,
) -> FinetuneOutput:
    """``w_s CE(student) + w_t CE(teacher) + w_c consistency`` for a patched model.

    task_type = [student on/off, teacher on/off, consistency threshold (0 = off)],
    as the public code's ``--task_type``. Consistency is the mean squared difference of
    the final class tokens (teacher detached), averaged over the samples whose student
    probability of the true class exceeds the threshold. ``targets`` are class indices,
    or soft targets ``(B, num_classes)`` (mixup) for a ``criterion`` that takes them; then
    ``confidence_classes`` ``(B, k)`` names the classes whose student probabilities are
    summed for the threshold test (mixup of sample i with sample B-1-i: its two labels).
    """
    if not hasattr(model, "mctf_state"):
        raise ValueError("model is not patched: call mctf.patch.timm(model, config) first")
    if len(task_type) != 3 or len(task_weight) != 3:
        raise ValueError("task_type and task_weight must have 3 entries (student, teacher, consistency)")
    hard = targets.dim() == 1 and targets.dtype in (torch.int64, torch.int32)
    if not hard and not (targets.dim() == 2 and targets.is_floating_point()):
        raise ValueError("targets must be a 1-D tensor of class indices or (B, num_classes) soft targets")
    if confidence_classes is None:
        if not hard and task_type[2]:
            raise ValueError("soft targets with a consistency threshold need confidence_classes (B, k)")
        confidence_classes = targets[:, None] if hard else None
    elif confidence_classes.dim() != 2 or confidence_classes.shape[0] != targets.shape[0]:
        raise ValueError("confidence_classes must be (B, k) class indices")
    criterion = criterion or F.cross_entropy
    use_student, use_teacher, threshold = task_type
    zero = images.new_zeros(())
    teacher_logits, r_t = None, None
    loss_t = loss_c = zero
    if use_teacher or threshold:
        if r_teacher is None and not hasattr(model.mctf_config, "r_teacher_max"):  # a ToMe model
            raise ValueError(f"{type(model.mctf_config).__name__} has no r_teacher_max to draw the teacher's r from: "
                             f"pass r_teacher, or task_type=(1, 0, 0) for the plain loss")
        r_t = sample_teacher_r(model.mctf_config.r_teacher_max, generator) if r_teacher is None else r_teacher
        teacher_logits, teacher_cls = _run(model, images, r_t)
        if use_teacher:
            loss_t = criterion(teacher_logits, targets) * task_weight[1]
    student_logits, student_cls = _run(model, images, None)
    loss_s = criterion(student_logits, targets) * task_weight[0] if use_student else zero
    if threshold:
        per_sample = ((teacher_cls.detach() - student_cls) ** 2).mean(dim=1)
        confidence = student_logits.softmax(-1).gather(1, confidence_classes.long()).sum(1)
        passed = (confidence > threshold).to(per_sample.dtype)
        # no host sync: zero when no sample passes (the public code skips the term)
        loss_c = (per_sample * passed).sum() / passed.sum().clamp_min(1) * task_weight[2]
    return FinetuneOutput(loss_s + loss_t + loss_c, student_logits, teacher_logits, loss_s, loss_t, loss_c, r_t)
