import pytest
import timm
import torch

import mctf


def tiny():
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=16, depth=2, num_heads=2, num_classes=3)


def test_public_format_and_plain_state_dict(tmp_path):
    src = tiny()
    public = tmp_path / "public.pth"
    torch.save({"model": src.state_dict(), "epoch": 29, "args": None}, public)
    plain = tmp_path / "plain.pth"
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, plain)
    for path in (public, plain):
        dst = mctf.patch.timm(tiny(), mctf.MCTFConfig(r=2, layers=(1,)))
        mctf.load_checkpoint(dst, path)
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v)


def test_mismatch_lists_offending_keys(tmp_path):
    sd = tiny().state_dict()
    sd.pop("head.weight")
    sd["blocks.0.attn.extra"] = torch.zeros(1)
    sd["pos_embed"] = torch.zeros(1, 5, 16)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(mctf.CheckpointMismatchError) as err:
        mctf.load_checkpoint(tiny(), path)
    msg = str(err.value)
    assert "head.weight" in msg and "blocks.0.attn.extra" in msg and "pos_embed" in msg


def test_missing_file_and_wrong_content(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        mctf.load_checkpoint(tiny(), tmp_path / "nope.pth")
    path = tmp_path / "junk.pth"
    torch.save({"epoch": 3}, path)
    with pytest.raises(mctf.CheckpointMismatchError, match="neither a state_dict"):
        mctf.load_checkpoint(tiny(), path)


def public_training_checkpoint(model, path):
    """A file written the way the paper's training script (DeiT's main.py) writes one:
    torch.save of the model, optimizer, scheduler, EMA and scaler states, the epoch and
    the argparse.Namespace of its command line."""
    import argparse

    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=30)
    scaler = torch.amp.GradScaler("cpu")
    args = argparse.Namespace(model="deit_small_patch16_224", batch_size=256, lr=5e-4, epochs=30,
                              mctf_type=[16, 8, 0, 1, 1, 1, 20, 40, 1, 1, 0], activate_layer=None,
                              output_dir="output", dist_eval=True, resume="", smoothing=0.1)
    torch.save({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(), "epoch": 29,
        "model_ema": {k: v.clone() for k, v in model.state_dict().items()},
        "scaler": scaler.state_dict(), "args": args,
    }, path)


def test_public_training_script_format_loads(tmp_path):
    src = tiny()
    path = tmp_path / "checkpoint.pth"
    public_training_checkpoint(src, path)
    dst = mctf.patch.timm(tiny(), mctf.MCTFConfig(r=2, layers=(1,)))
    mctf.load_checkpoint(dst, path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


class Payload:
    """Any class but argparse.Namespace: loading must refuse it, never construct it."""

    def __reduce__(self):
        return (_record_unpickled, ())


UNPICKLED = []


def _record_unpickled():
    UNPICKLED.append(True)
    return "ran"


def test_other_classes_are_refused_not_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny().state_dict(), "args": Payload()}, path)
    with pytest.raises(mctf.CheckpointLoadError, match="evil.pth holds .*_record_unpickled.*refusing"):
        mctf.load_checkpoint(tiny(), path)
    assert UNPICKLED == []


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "pickle_prefix"])
def test_unreadable_files_name_the_file(tmp_path, damage):
    good = tmp_path / "good.pth"
    torch.save({"model": tiny().state_dict()}, good)
    data = good.read_bytes()
    path = tmp_path / f"{damage}.pth"
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\x00not a checkpoint" * 50,
                      "pickle_prefix": b"\x80\x02}q\x00"}[damage])
    with pytest.raises(mctf.CheckpointLoadError, match=f"{damage}.pth"):
        mctf.load_checkpoint(tiny(), path)
