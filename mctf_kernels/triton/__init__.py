"""Fused Triton kernels. ``LAUNCHERS`` maps an op name to its launcher; each
launcher takes exactly the arguments of the op's reference in ``mctf_kernels``.
"""
LAUNCHERS: dict = {}

from .merge import merge as _merge  # noqa: E402

LAUNCHERS["merge"] = _merge
from .slots import slot_index as _slot_index  # noqa: E402

LAUNCHERS["slot_index"] = _slot_index
from .attention import attention_received as _attention_received  # noqa: E402
from .attention import fused_attention_output as _fused_attention_output  # noqa: E402

LAUNCHERS["attention_received"] = _attention_received
LAUNCHERS["fused_attention_output"] = _fused_attention_output
from . import match as _match  # noqa: E402,F401  (registers LAUNCHERS["match"])
from .flash_attention import fused_attention_output_qk as _fused_attention_output_qk  # noqa: E402
from .flash_attention import fusion_attention as _fusion_attention  # noqa: E402

LAUNCHERS["fusion_attention"] = _fusion_attention
LAUNCHERS["fused_attention_output_qk"] = _fused_attention_output_qk
