"""Token Merging (ToMe) blocks for a timm VisionTransformer, on the same ops as MCTF
(docs/algorithm.md, "ToMe mode").

``mctf.patch.timm(model, mctf.ToMeConfig(...))`` lands here: the model gets the same
patched class as for MCTF (fresh state per forward, size-weighted average pooling,
pickling) and its blocks become ``ToMeBlock``. ``mctf.unpatch`` undoes it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import mctf_kernels as mk
from mctf.config import ToMeConfig
from mctf.patch.timm import (
    PATCHED_BLOCKS, TimmBlock, _attention, _check_supported, _heads, _log_size_bias,
    _output, _install, mergeable_norm,
)
from mctf.state import ToMeState


class ToMeBlock(TimmBlock):
    """timm Block that merges tokens between its attention residual and its MLP.

    The metric is this block's keys (after timm's k norm) averaged over heads, taken
    from the q/k/v projection the attention computes anyway. timm's own submodules
    (layer scale, drop path, q/k norm) run as in the unpatched block.
    """

    _mctf_index: int
    _mctf_state: ToMeState

    def _merge(self, x: torch.Tensor, metric: torch.Tensor, r: int, state: ToMeState, norm=None):
        """Merge x; with ``norm`` also returns norm2 of the merged tokens from the merge's pass."""
        cfg = state.config
        B, T, _ = x.shape
        t_out = T - r
        # the slot index from the matcher's own launch (None with the reference, which does not read it)
        dest, slots = mk.match(metric.detach(), r, num_protected=state.num_protected, bidirectional=False,
                               score="cosine", return_slots=True)
        source = None
        if cfg.trace_source:
            source = state.source
            if source is None:
                source = torch.eye(T, device=x.device, dtype=x.dtype).expand(B, T, T)
        merged = mk.merge(x, dest, t_out, state.size, None, mode=0, source=source, slots=slots, norm=norm)
        x, state.size, new_source = merged[:3]
        if cfg.trace_source:
            state.source = new_source
        return x, (merged[3] if norm is not None else None)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False, **kwargs) -> torch.Tensor:
        if attn_mask is not None or is_causal or kwargs:
            raise NotImplementedError("ToMe blocks do not support attention masks or causal attention")
        state = self._mctf_state
        size = state.size if state.config.prop_attn else None
        r = state.r_for_block(self._mctf_index, x.shape[1])
        if r > 0:
            attn = self.attn
            q, k, v = _heads(attn, self.norm1(x))
            heads = F.scaled_dot_product_attention(
                q, k, v, attn_mask=_log_size_bias(size, q.dtype),
                dropout_p=attn.attn_drop.p if self.training else 0.0, scale=attn.scale,
            )
            x = x + self.drop_path1(self.ls1(_output(attn, heads)))
            # norm2 of the merged tokens comes from the merge's own pass when it can
            x, normed = self._merge(x, k.mean(dim=1), r, state, mergeable_norm(self.norm2, x))
        else:
            x = x + self.drop_path1(self.ls1(_attention(self.attn, self.norm1(x), size)))
            normed = None
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x) if normed is None else normed)))
        state.tokens_per_block.append(x.shape[1])
        return x


PATCHED_BLOCKS.add(ToMeBlock)


def patch_tome(model, config: ToMeConfig):
    """Patch ``model`` in place for ToMe with ``config`` and return it (see ``mctf.patch.timm``)."""
    if not isinstance(config, ToMeConfig):
        raise TypeError(f"config must be an mctf.ToMeConfig, got {type(config).__name__}")
    _check_supported(model)
    depth = len(model.blocks)
    state = ToMeState(config=config.for_depth(depth), num_protected=model.num_prefix_tokens, depth=depth,
                      schedule=config.schedule(depth))
    return _install(model, config, state, ToMeBlock)
