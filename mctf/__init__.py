"""mctf: Multi-criteria Token Fusion (CVPR 2024) for timm Vision Transformers.

    import mctf, timm
    model = mctf.patch.timm(timm.create_model("deit_small_patch16_224"), mctf.MCTFConfig.preset("mctf"))

The ops run on ``mctf_kernels`` (eager reference or fused Triton kernels, see
``mctf.set_backend``). This layer knows nothing of Triton. What MCTF computes:
docs/algorithm.md.

The names below load on first use, so ``import mctf.cli.bench`` (the console scripts)
can parse arguments and answer ``--help`` without importing torch.
"""
import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "BACKENDS": "mctf_kernels", "BackendUnavailable": "mctf_kernels", "get_backend": "mctf_kernels",
    "set_backend": "mctf_kernels", "use_backend": "mctf_kernels",
    "CheckpointMismatchError": "mctf.checkpoint", "CheckpointLoadError": "mctf.checkpoint",
    "load_checkpoint": "mctf.checkpoint",
    "MCTF_TYPE_FIELDS": "mctf.config", "MCTFConfig": "mctf.config", "ToMeConfig": "mctf.config",
    "UnsupportedModelError": "mctf.patch", "unpatch": "mctf.patch",
    "MCTFState": "mctf.state", "ToMeState": "mctf.state",
}

__all__ = [
    "patch", "unpatch", "MCTFConfig", "ToMeConfig", "ToMeState", "MCTF_TYPE_FIELDS", "MCTFState", "load_checkpoint",
    "CheckpointMismatchError", "CheckpointLoadError", "UnsupportedModelError",
    "BACKENDS", "BackendUnavailable", "get_backend", "set_backend", "use_backend",
]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name == "patch":
        value = importlib.import_module("mctf.patch")
    else:
        raise AttributeError(f"module 'mctf' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
