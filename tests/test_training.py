import pytest
import timm
import torch
import torch.nn.functional as F

import mctf
from mctf.training import finetune_loss, sample_teacher_r


def tiny_patched(**cfg):
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8,
                              embed_dim=32, depth=4, num_heads=2, num_classes=5)
    return mctf.patch.timm(model, mctf.MCTFConfig(r=8, layers=(1, 2, 3), r_teacher_max=4, **cfg))


def test_loss_terms_match_their_definitions():
    torch.manual_seed(0)
    model = tiny_patched().eval()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    out = finetune_loss(model, x, y, task_type=(1, 1, 0.0001), task_weight=(1.0, 0.5, 3.0), r_teacher=2)
    with torch.no_grad():
        student = model(x)
        assert model.mctf_state.tokens_per_block == [65, 57, 49, 41]
    torch.testing.assert_close(out.student_logits, student)
    torch.testing.assert_close(out.loss_student, F.cross_entropy(student, y))
    torch.testing.assert_close(out.loss_teacher, 0.5 * F.cross_entropy(out.teacher_logits, y))
    assert out.loss_consistency > 0
    torch.testing.assert_close(out.loss, out.loss_student + out.loss_teacher + out.loss_consistency)
    out.loss.backward()
    assert model.head.weight.grad is not None


def test_consistency_is_zero_when_no_sample_is_confident():
    model = tiny_patched().eval()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    out = finetune_loss(model, x, y, task_type=(1, 0, 0.999999), r_teacher=0)
    assert out.loss_consistency.item() == 0.0 and out.teacher_logits is not None


def test_teacher_r_draws():
    g = torch.Generator().manual_seed(0)
    draws = {sample_teacher_r(8, g) for _ in range(200)}
    assert draws <= set(range(8)) and len(draws) > 4
    fractions = [sample_teacher_r(0.3, g) for _ in range(100)]
    assert all(0 <= f < 0.3 for f in fractions)
    assert sample_teacher_r(0) == 0


def test_soft_targets_with_confidence_classes():
    """Mixup's soft targets: with one-hot targets and the labels as confidence classes, the
    loss is the hard-target loss; two classes per sample sum their probabilities for the gate."""
    from timm.loss import SoftTargetCrossEntropy

    model = tiny_patched().eval()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    soft = F.one_hot(y, 5).float()
    hard = finetune_loss(model, x, y, task_type=(1, 1, 0.1), r_teacher=2)
    out = finetune_loss(model, x, soft, task_type=(1, 1, 0.1), r_teacher=2, criterion=SoftTargetCrossEntropy(),
                        confidence_classes=y[:, None])
    torch.testing.assert_close(out.loss, hard.loss)
    # a threshold only the summed probability of both classes passes
    both = torch.stack([y, y.flip(0)], dim=1)
    probs = out.student_logits.detach().softmax(-1)
    threshold = float(probs.gather(1, y[:, None]).max()) + 1e-4
    assert float(probs.gather(1, both).sum(1).max()) > threshold
    one = finetune_loss(model, x, soft, task_type=(1, 1, threshold), r_teacher=2,
                        criterion=SoftTargetCrossEntropy(), confidence_classes=y[:, None])
    two = finetune_loss(model, x, soft, task_type=(1, 1, threshold), r_teacher=2,
                        criterion=SoftTargetCrossEntropy(), confidence_classes=both)
    assert one.loss_consistency.item() == 0.0 and two.loss_consistency.item() > 0
    with pytest.raises(ValueError, match="confidence_classes"):
        finetune_loss(model, x, soft, task_type=(1, 1, 0.4), criterion=SoftTargetCrossEntropy())
