"""``mctf.patch.timm(model, config)``: one line to put MCTF in a timm ViT."""
from .timm import MCTFBlock, UnsupportedModelError, patch_timm as timm, unpatch

__all__ = ["timm", "unpatch", "MCTFBlock", "UnsupportedModelError"]
