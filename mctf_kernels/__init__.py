"""mctf_kernels: the ops of Multi-criteria Token Fusion, with eager references
and fused Triton kernels. Knows nothing of timm; see ``mctf`` for the model layer.
"""
from .attention import (
    FusionAttention,
    attention_logits_reference,
    attention_received_reference,
    fused_attention_output_qk_reference,
    fusion_attention_reference,
    fusion_attention_rows_reference,
    fused_attention_output_reference,
    merged_attention_reference,
)
from .dispatch import BACKENDS, BackendUnavailable, get_backend, set_backend, use_backend
from .match import match_from_scores_reference, match_reference
from .merge import MergeNorm, merge_norm_reference, merge_reference, pooling_weights
from .ops import (
    attention_received,
    fused_attention_output,
    fused_attention_output_from,
    fusion_attention,
    fusion_attention_rows,
    match,
    merge,
    shared_slot_index,
    slot_index,
)
from .schedule import split_directions, tokens_to_remove, tome_tokens_to_remove
from .scores import scores_reference
from .slots import SlotIndex, slot_index_reference

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BackendUnavailable", "get_backend", "set_backend", "use_backend",
    "tokens_to_remove", "split_directions",
    "match", "merge", "MergeNorm", "merge_norm_reference", "slot_index", "shared_slot_index", "SlotIndex", "slot_index_reference", "attention_received", "fused_attention_output",
    "fusion_attention", "fused_attention_output_from", "fusion_attention_rows", "FusionAttention",
    "attention_logits_reference", "fusion_attention_reference", "fusion_attention_rows_reference", "fused_attention_output_qk_reference",
    "scores_reference", "match_reference", "match_from_scores_reference", "merge_reference",
    "pooling_weights", "attention_received_reference", "fused_attention_output_reference",
    "merged_attention_reference",
    "tome_tokens_to_remove",
]
