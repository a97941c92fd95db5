"""Patch a timm VisionTransformer in place so its blocks run MCTF.

The model's and blocks' classes are swapped for subclasses (``__class__``
assignment), so weights, hooks and timm's own submodules (norms, layer scale,
drop path, q/k norm) are the ones already there. ``unpatch`` swaps them back.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F

import mctf_kernels as mk
from mctf.config import MCTFConfig, ToMeConfig
from mctf.state import MCTFState

try:  # timm is a model-layer dependency only
    from timm.layers.norm import LayerNorm as TimmLayerNorm
    from timm.models.vision_transformer import Attention as TimmAttention
    from timm.models.vision_transformer import Block as TimmBlock
    from timm.models.vision_transformer import LayerScale as TimmLayerScale
    from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
except ImportError as exc:  # pragma: no cover - timm is a hard dependency
    raise ImportError("mctf.patch.timm needs timm >= 1.0") from exc


# LayerNorm classes whose forward is F.layer_norm (timm's unless fast_norm is on): norm1 of
# the fused tokens may then be computed by the merge kernel
_PLAIN_LAYER_NORM_FORWARDS = (torch.nn.LayerNorm.forward, TimmLayerNorm.forward)


class UnsupportedModelError(TypeError):
    """The model (or one of its parts) has no MCTF patch."""


# ---------------------------------------------------------------------------
# attention pieces, delegating to timm's Attention submodules


def _heads(attn: TimmAttention, x: torch.Tensor):
    """q, k, v of shape (B, H, T, D) with timm's q/k norms applied."""
    B, T, _ = x.shape
    # explicit head_dim, not -1: -1 is ambiguous for an empty batch
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


# attention module -> (key, cast slices); kept off the module so that pickling, deepcopy and
# state_dict never carry it, and dropped with the module
_QKV_CASTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _split_qkv(attn: TimmAttention, x: torch.Tensor):
    """(w_qk, b_qk, w_v, b_v): ``attn.qkv`` split into its query-key and value rows.

    Slices of the weight are not leaves, so autocast would cast them again at every
    call; in inference under autocast the cast slices are cached per module, keyed on
    the autocast dtype, the device and the weight's and bias's storage and version
    counter (any in-place update, e.g. an optimizer step or load_state_dict, bumps it;
    writes through ``.data`` do not and are not seen). Not cached: with gradients on,
    while torch.compile traces (it fuses the casts itself), during CUDA-graph capture
    (the graph must replay the cast, or it would keep stale weights after an update),
    and for float64 weights (autocast leaves those alone).
    """
    w, b = attn.qkv.weight, attn.qkv.bias
    n = attn.qkv.out_features // 3
    device_type = x.device.type
    if (torch.is_autocast_enabled(device_type) and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and w.dtype != torch.float64
            and not (device_type == "cuda" and torch.cuda.is_current_stream_capturing())):
        dtype = torch.get_autocast_dtype(device_type)
        key = (dtype, w.device, w.data_ptr(), w._version) + (() if b is None else (b.data_ptr(), b._version))
        cached = _QKV_CASTS.get(attn)
        if cached is None or cached[0] != key:
            wc = w.detach().to(dtype)
            bc = None if b is None else b.detach().to(dtype)
            cached = (key, (wc[: 2 * n], None if bc is None else bc[: 2 * n],
                            wc[2 * n:], None if bc is None else bc[2 * n:]))
            _QKV_CASTS[attn] = cached
        return cached[1]
    return (w[: 2 * n], None if b is None else b[: 2 * n], w[2 * n:], None if b is None else b[2 * n:])


def _queries_keys(attn: TimmAttention, x: torch.Tensor):
    """q, k (B, H, T, D) only: the one-step-ahead blocks take values from the fused tokens,
    so projecting values for the unfused tokens would be wasted work."""
    B, T, _ = x.shape
    weight, bias, _, _ = _split_qkv(attn, x)
    qk = F.linear(x, weight, bias).reshape(B, T, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = qk.unbind(0)
    return attn.q_norm(q), attn.k_norm(k)


def _values(attn: TimmAttention, x: torch.Tensor) -> torch.Tensor:
    """Only the value projection (B, H, T, D): the fused block never recomputes q, k."""
    B, T, _ = x.shape
    _, _, weight, bias = _split_qkv(attn, x)
    return F.linear(x, weight, bias).reshape(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)


def _output(attn: TimmAttention, heads: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) head outputs -> projected (B, T, C), as timm's Attention ends."""
    B, H, T, D = heads.shape
    x = heads.transpose(1, 2).reshape(B, T, H * D)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        x = norm(x)
    return attn.proj_drop(attn.proj(x))


def _log_size_bias(size: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if size is None else size.log().to(dtype)[:, None, None, :]


def _log_size(size: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if size is None else size.log()


def _softmax_probs(attn: TimmAttention, q, k, size: Optional[torch.Tensor]) -> torch.Tensor:
    """Explicit softmax(q k^T * scale [+ log s]) (B, H, T, T)."""
    return mk.attention_logits_reference(q, k, attn.scale, _log_size(size)).softmax(dim=-1)


def _attention(attn: TimmAttention, x: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
    """A normal attention layer, with proportional attention when ``size`` is given."""
    if size is None:
        return attn(x)
    q, k, v = _heads(attn, x)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=_log_size_bias(size, q.dtype),
        dropout_p=attn.attn_drop.p if attn.training else 0.0, scale=attn.scale,
    )
    return _output(attn, out)


def mergeable_norm(norm: torch.nn.Module, x: torch.Tensor, at_tokens: bool = False) -> Optional[mk.MergeNorm]:
    """``norm`` as a LayerNorm the merge applies in its own pass (inference only: the merge
    kernel's LayerNorm output has no backward), in the dtype the next projection reads (under
    autocast: the autocast dtype it would cast to). None: the norm must run as a module."""
    # plain F.layer_norm only (timm's LayerNorm with fast_norm, or other subclasses, may differ)
    if (torch.is_grad_enabled() or not isinstance(norm, torch.nn.LayerNorm) or getattr(norm, "_fast_norm", False)
            or type(norm).forward not in _PLAIN_LAYER_NORM_FORWARDS or norm.weight is None or norm.bias is None
            or tuple(norm.normalized_shape) != (x.shape[-1],)):
        return None
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    if x.dtype == torch.float64:  # autocast leaves float64 alone
        dtype = x.dtype
    return mk.MergeNorm(norm.weight, norm.bias, float(norm.eps), dtype, at_tokens)


def _residual_scale(block: TimmBlock):
    """(True, gamma or None) when ``x + drop_path1(ls1(y))`` is ``x + gamma * y`` (eval, or no
    drop path; ls1 timm's LayerScale or identity), so the merge's epilogue can add it; else (False, None)."""
    if block.training and not isinstance(block.drop_path1, torch.nn.Identity):
        return False, None
    if isinstance(block.ls1, torch.nn.Identity):
        return True, None
    if isinstance(block.ls1, TimmLayerScale):
        return True, block.ls1.gamma
    return False, None


# ---------------------------------------------------------------------------
# the patched block


class MCTFBlock(TimmBlock):
    """timm Block whose forward fuses tokens where the config says so (docs/algorithm.md, "One-step-ahead attention")."""

    _mctf_index: int
    _mctf_state: MCTFState

    def _fused_norm1(self, x: torch.Tensor) -> Optional[mk.MergeNorm]:
        """norm1 as a LayerNorm the merge can apply in its own pass (``mergeable_norm``). None: keep norm1."""
        return mergeable_norm(self.norm1, x)

    def _fuse(self, x: torch.Tensor, attn_received: torch.Tensor, r: int, state: MCTFState,
              norm: Optional[mk.MergeNorm] = None):
        """Match and merge x using the attention each token received; updates the state.
        With ``norm``, also returns LayerNorm(x') computed in the merge's pass (else None)."""
        cfg = state.config
        T = x.shape[1]
        t_out = T - r
        # the slot index, once per layer for the merge and the attention output, comes from
        # the matcher's own launch (None with the reference, which pools by dest)
        dest, slots = mk.match(
            x.detach(), r, attn_received, state.size,
            tau_sim=cfg.tau_sim, tau_info=cfg.tau_info, tau_size=cfg.tau_size,
            num_protected=state.num_protected, bidirectional=cfg.bidirectional, return_slots=True,
        )
        source = state.source
        if cfg.trace_source and source is None:
            source = torch.eye(T, device=x.device, dtype=x.dtype).expand(x.shape[0], T, T)
        old_size = state.size
        merged = mk.merge(
            x, dest, t_out, old_size, attn_received, mode=cfg.pooling,
            source=source if cfg.trace_source else None, slots=slots, norm=norm,
        )
        x_new, new_size, new_source = merged[:3]
        state.size = new_size
        if cfg.trace_source:
            state.source = new_source
        return x_new, dest, old_size, attn_received, slots, (merged[3] if norm is not None else None)

    def _rows_flow(self, norm1: Optional[mk.MergeNorm], mode: int) -> bool:
        """Whether one-step-ahead inference can take the rows flow (``_fused_attention_rows``):
        no gradients and norm1 the merge applies (``norm1`` given: ``_fused_norm1``), a weighted
        pooling (a slot's weights sum to 1, so the row merge commutes with the affine ``proj``;
        max pooling does not), nothing between the heads and ``proj`` (timm's ``scale_norm``
        off) and no dropout on the rows (eval, or rates of 0)."""
        attn = self.attn
        plain_heads = isinstance(getattr(attn, "norm", None), (torch.nn.Identity, type(None)))
        return (norm1 is not None and mode != 2 and plain_heads
                and not (self.training and (attn.attn_drop.p > 0 or attn.proj_drop.p > 0)))

    def _fused_attention_rows(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, size: Optional[torch.Tensor],
                              r: int, state: MCTFState, norm1: mk.MergeNorm):
        """One-step-ahead inference, the rows flow: ``x' + ls1(rowmerge(proj(P @ V'[dest])))``,
        equal to ``x' + ls1(proj(P' @ V'))`` (docs/algorithm.md, "One-step-ahead attention").
        The merge of the tokens writes LN1(x') at the T token positions, so the value projection
        gives V'[dest] directly; torch's fused attention gives the rows at T (the attention kernel
        already wrote its log-size mask), ``proj`` runs on those rows, and the row merge comes
        last, adding the residual (and layer scale) and applying norm2 in the same pass.
        Returns (x, norm2(x) or None when norm2 must run as a module)."""
        cfg = state.config
        att = mk.fusion_attention(q, k, scale=self.attn.scale, size=size, mode=cfg.pooling)
        x1, dest, old_size, received, slots, n1_tokens = self._fuse(x, att.received, r, state, norm1)
        rows = mk.fusion_attention_rows(att, _values(self.attn, n1_tokens))
        y = _output(self.attn, rows)  # proj on the T rows
        fold, gamma = _residual_scale(self)
        if not fold:
            pooled = mk.merge(y, dest, x1.shape[1], old_size, received, mode=cfg.pooling, slots=slots)[0]
            return x1 + self.drop_path1(self.ls1(pooled)), None
        norm2 = mergeable_norm(self.norm2, x1)
        merged = mk.merge(y, dest, x1.shape[1], old_size, received, mode=cfg.pooling, slots=slots,
                          residual=x1, residual_scale=gamma, norm=norm2)
        return merged[0], (merged[3] if norm2 is not None else None)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False, **kwargs) -> torch.Tensor:
        if attn_mask is not None or is_causal or kwargs:
            raise NotImplementedError("MCTF blocks do not support attention masks or causal attention")
        state = self._mctf_state
        cfg = state.config
        r = state.r_for_block(self._mctf_index, x.shape[1])
        size = state.size if cfg.prop_attn else None
        normed2 = None  # norm2(x) when the rows flow's merge computed it

        if r > 0 and cfg.one_step_ahead == 1:
            # fuse with this layer's attention, then reuse it merged: P' @ V(LN1(x'))
            q, k = _queries_keys(self.attn, self.norm1(x))
            norm1 = self._fused_norm1(x)  # None: norm1 of the fused tokens runs as a module
            if self.training and self.attn.attn_drop.p > 0:  # dropout needs P formed
                probs = self.attn.attn_drop(_softmax_probs(self.attn, q, k, size))
                x, dest, old_size, received, slots, _ = self._fuse(x, mk.attention_received(probs.detach()), r, state)
                heads = mk.fused_attention_output(
                    probs, _values(self.attn, self.norm1(x)), dest, x.shape[1], old_size, received, mode=cfg.pooling,
                    slots=slots,
                )
                x = x + self.drop_path1(self.ls1(_output(self.attn, heads)))
            elif self._rows_flow(norm1, cfg.pooling):  # inference
                x, normed2 = self._fused_attention_rows(x, q, k, size, r, state, norm1._replace(at_tokens=True))
            else:
                att = mk.fusion_attention(q, k, scale=self.attn.scale, log_size=_log_size(size), mode=cfg.pooling)
                # norm1 of the fused tokens comes from the merge's own pass when it can
                x, dest, old_size, _, slots, normed = self._fuse(x, att.received, r, state, norm1)
                heads = mk.fused_attention_output_from(
                    att, _values(self.attn, self.norm1(x) if normed is None else normed), dest, x.shape[1],
                    old_size, mode=cfg.pooling, slots=slots,
                )
                x = x + self.drop_path1(self.ls1(_output(self.attn, heads)))
        elif r > 0 and cfg.one_step_ahead == 2:
            with torch.no_grad():  # "precise": this attention only picks the tokens
                q, k = _queries_keys(self.attn, self.norm1(x))
                att = mk.fusion_attention(q, k, scale=self.attn.scale, log_size=_log_size(size))
            x, *_ = self._fuse(x, att.received, r, state)
            size = state.size if cfg.prop_attn else None
            x = x + self.drop_path1(self.ls1(_attention(self.attn, self.norm1(x), size)))
        elif r > 0:  # one_step_ahead == 0: normal block, fuse its output with its attention
            q, k, v = _heads(self.attn, self.norm1(x))
            probs = _softmax_probs(self.attn, q, k, size)
            heads = self.attn.attn_drop(probs) @ v
            x = x + self.drop_path1(self.ls1(_output(self.attn, heads)))
        else:
            x = x + self.drop_path1(self.ls1(_attention(self.attn, self.norm1(x), size)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x) if normed2 is None else normed2)))
        if r > 0 and cfg.one_step_ahead == 0:
            x, *_ = self._fuse(x, mk.attention_received(probs.detach()), r, state)
        state.tokens_per_block.append(x.shape[1])
        return x


# block classes a patch puts in (ToMe adds its own, mctf/patch/tome.py): re-patching and
# unpatch accept them
PATCHED_BLOCKS = {MCTFBlock}


# ---------------------------------------------------------------------------
# the patched model

class MCTFModel:
    """What a patched timm VisionTransformer adds: every entry point (``forward``,
    ``forward_features``, ``forward_intermediates``) starts a fresh MCTF state, and
    ``forward_head`` pools by token size. Mixed in before the original class, so
    ``super()`` is timm's method. Instances pickle (``torch.save(model)``) as
    "this mixin over that timm class", which any process with mctf can rebuild."""

    _mctf_original_class: type
    mctf_state: MCTFState

    def forward(self, *args, **kwargs):
        self.mctf_state.reset()
        return super().forward(*args, **kwargs)

    def forward_features(self, *args, **kwargs):
        # timm's forward calls this too; resetting twice in one forward is harmless
        self.mctf_state.reset()
        return super().forward_features(*args, **kwargs)

    def forward_intermediates(self, x: torch.Tensor, indices=None, *args, **kwargs):
        self.mctf_state.reset()
        # timm's order after indices: return_prefix_tokens, norm, stop_early, output_fmt
        output_fmt = kwargs.get("output_fmt", args[3] if len(args) > 3 else "NCHW")
        if output_fmt == "NCHW":
            self._check_grid_intermediates(x, indices)
        return super().forward_intermediates(x, indices, *args, **kwargs)

    def _check_grid_intermediates(self, x: torch.Tensor, indices) -> None:
        """A fused token set is not an H x W grid: name the option that works instead."""
        from timm.models._features import feature_take_indices

        take, _ = feature_take_indices(len(self.blocks), indices)
        h, w = self.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
        tokens = h * w + self.num_prefix_tokens
        planned = self.mctf_state.planned_tokens(tokens)
        fused = [i for i in take if planned[i] != tokens]
        if fused:
            raise ValueError(
                f"output_fmt='NCHW' needs an H x W token grid, but token fusion (MCTF or ToMe) has merged tokens "
                f"by blocks {fused}; "
                f"use output_fmt='NLC' (tokens in order, sizes in model.mctf_state) or earlier indices"
            )

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average pooling weighted by token size: each token counts as the patches it holds."""
        if self.global_pool != "avg" or getattr(self, "attn_pool", None) is not None:
            return super().forward_head(x, pre_logits=pre_logits)
        start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
        tokens = x[:, start:]
        size = self.mctf_state.size
        if size is None or size.shape[:2] != x.shape[:2]:
            if size is not None:
                raise ValueError(f"forward_head got {tuple(x.shape[:2])} tokens but the last MCTF forward left sizes "
                                 f"{tuple(size.shape)}: pass the output of this model's last forward_features")
            pooled = tokens.mean(dim=1)
        else:
            w = size[:, start:].to(tokens.dtype)[..., None]
            pooled = (tokens * w).sum(dim=1) / w.sum(dim=1)
        pooled = self.fc_norm(pooled)
        pooled = self.head_drop(pooled)
        return pooled if pre_logits else self.head(pooled)

    def __reduce_ex__(self, protocol):
        # the class is made per timm class at patch time; pickle the recipe, not its name
        reduced = super().__reduce_ex__(protocol)
        return (_new_patched, (self._mctf_original_class,)) + tuple(reduced[2:])


class MCTFVisionTransformer(MCTFModel, TimmVisionTransformer):
    """A patched timm ``VisionTransformer`` (DeiT, ViT, DeiT-3, register models)."""

    _mctf_original_class = TimmVisionTransformer


_PATCHED_CLASSES: dict = {TimmVisionTransformer: MCTFVisionTransformer}


def _patched_class(cls: type) -> type:
    """``MCTFVisionTransformer`` for timm's class, and one class per subclass (e.g. the
    distilled DeiT), made once and named ``MCTF<name>`` in this module."""
    if cls not in _PATCHED_CLASSES:
        name = f"MCTF{cls.__name__}"
        _PATCHED_CLASSES[cls] = type(name, (MCTFModel, cls), {
            "_mctf_original_class": cls, "__module__": __name__, "__qualname__": name,
            "__doc__": f"A patched timm ``{cls.__name__}``.",
        })
    return _PATCHED_CLASSES[cls]


def _new_patched(original: type):
    """Unpickling: an empty instance of ``original``'s patched class (state set after)."""
    cls = _patched_class(original)
    return cls.__new__(cls)


def _check_supported(model) -> None:
    if not isinstance(model, TimmVisionTransformer):
        raise UnsupportedModelError(
            f"mctf.patch.timm supports timm VisionTransformer models (DeiT, ViT, DeiT-3, registers); "
            f"got {type(model).__name__}"
        )
    if getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError("global_pool='map' (attention pooling) is not supported by MCTF")
    if model.global_pool not in ("token", "avg", ""):
        raise UnsupportedModelError(f"global_pool={model.global_pool!r} is not supported; use 'token' or 'avg'")
    if model.num_prefix_tokens == 0 and model.global_pool == "token":
        raise UnsupportedModelError("global_pool='token' needs a class token")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not TimmBlock and type(blk) not in PATCHED_BLOCKS:
            raise UnsupportedModelError(
                f"block {i} is a {type(blk).__name__}; only timm's standard pre-norm Block is supported"
            )
        if type(blk.attn) is not TimmAttention:
            raise UnsupportedModelError(f"block {i} attention is a {type(blk.attn).__name__}, not timm's Attention")
        if getattr(blk.attn, "gate", None) is not None:
            raise UnsupportedModelError(f"block {i} uses gated attention, which MCTF does not support")


def patch_timm(model, config: Optional[MCTFConfig] = None):
    """Patch ``model`` (a timm VisionTransformer) in place for MCTF and return it.

    Patching an already patched model replaces its configuration. ``model.mctf_config``
    is ``config`` with its blocks fixed for this model's depth (a preset made without
    ``depth`` fuses 1..depth-1, or every (depth // 4)-th block for "mctf-fast").
    An ``mctf.ToMeConfig`` patches the blocks for Token Merging instead (``mctf/patch/tome.py``).
    """
    config = MCTFConfig() if config is None else config

    if isinstance(config, ToMeConfig):  # Token Merging on the same ops: its own blocks
        from mctf.patch.tome import patch_tome

        return patch_tome(model, config)
    if not isinstance(config, MCTFConfig):
        raise TypeError(f"config must be an mctf.MCTFConfig or mctf.ToMeConfig, got {type(config).__name__}")
    _check_supported(model)
    depth = len(model.blocks)
    config = config.for_depth(depth)  # a preset's blocks follow this model's depth
    active = frozenset(config.layers)
    state = MCTFState(config=config, num_protected=model.num_prefix_tokens, depth=depth, active=active)
    return _install(model, config, state, MCTFBlock)


def _install(model, config, state, block_class: type):
    """Give ``model`` its patched class, ``config`` and ``state``, and make every block a
    ``block_class`` (one of ``PATCHED_BLOCKS``) sharing that state. Returns the model."""
    original = getattr(model, "_mctf_original_class", type(model))
    model.__class__ = _patched_class(original)
    model.mctf_state = state
    model.mctf_config = config
    for i, blk in enumerate(model.blocks):
        blk.__class__ = block_class
        blk._mctf_index = i
        blk._mctf_state = state
    return model


def unpatch(model):
    """Undo ``patch_timm``: original classes back, MCTF attributes removed. Returns the model."""
    original = getattr(model, "_mctf_original_class", None)
    if original is None:
        raise ValueError("model is not patched by mctf")
    model.__class__ = original
    for name in ("mctf_state", "mctf_config"):
        model.__dict__.pop(name, None)
    for blk in model.blocks:
        if type(blk) in PATCHED_BLOCKS:
            blk.__class__ = TimmBlock
            for name in ("_mctf_index", "_mctf_state"):
                blk.__dict__.pop(name, None)
            _QKV_CASTS.pop(blk.attn, None)
    return model
