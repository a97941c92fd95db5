"""mctf: Multi-criteria Token Fusion (CVPR 2024) for timm Vision Transformers.

    import mctf, timm
    model = mctf.patch.timm(timm.create_model("deit_small_patch16_224"), mctf.MCTFConfig.preset("mctf"))

The ops run on ``mctf_kernels`` (eager reference or fused Triton kernels, see
``mctf.set_backend``). This layer knows nothing of Triton.
"""
from mctf_kernels import BACKENDS, BackendUnavailable, get_backend, set_backend, use_backend

from . import patch
from .checkpoint import CheckpointLoadError, CheckpointMismatchError, load_checkpoint
from .config import MCTF_TYPE_FIELDS, MCTFConfig
from .patch import UnsupportedModelError, unpatch
from .state import MCTFState

__version__ = "0.1.0"

__all__ = [
    "patch", "unpatch", "MCTFConfig", "MCTF_TYPE_FIELDS", "MCTFState", "load_checkpoint",
    "CheckpointMismatchError", "CheckpointLoadError", "UnsupportedModelError",
    "BACKENDS", "BackendUnavailable", "get_backend", "set_backend", "use_backend",
]
