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
