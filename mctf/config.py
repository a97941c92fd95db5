"""MCTF configuration: one dataclass, the paper's presets, and the public code's list format."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple, Union

Number = Union[int, float]

PRESETS = ("mctf", "mctf-fast")

# Order of the public code's 11-entry `mctf_type` list.
MCTF_TYPE_FIELDS = (
    "r", "r_teacher_max", "trace_source", "prop_attn", "one_step_ahead",
    "tau_sim", "tau_info", "tau_size", "bidirectional", "pooling", "unused",
)


@dataclasses.dataclass(frozen=True)
class MCTFConfig:
    """What one MCTF-patched model computes.

    r:              tokens removed per active layer: a count (>= 1) or a fraction (< 1) of
                    the mergeable tokens; clamped per layer (docs/algorithm.md, "How many
                    tokens a layer removes").
    layers:         block indices where fusion runs (block 0 is index 0); None = every block.
    preset_layers:  instead of ``layers``, a preset's block rule resolved against the model's
                    depth when it is patched ("mctf": 1..depth-1, "mctf-fast": every
                    (depth // 4)-th block); set by ``preset`` without ``depth``.
    tau_sim, tau_info, tau_size:
                    temperatures of the similarity, informativeness and size criteria;
                    0 switches that criterion off.
    bidirectional:  two-stage matching (A->B, then B->unmerged A) instead of A->B only.
    one_step_ahead: 0 fuse after the block with its attention; 1 fuse before attention and
                    reuse the fused attention (the paper's default); 2 "precise": fuse with
                    attention computed first, then run normal attention on the fused tokens.
    pooling:        0 size-weighted, 1 attention-and-size weighted (default), 2 max, 3 mean.
    prop_attn:      proportional attention (log token size added to attention logits).
    trace_source:   record which original patches each token holds (model.mctf_state.source).
    r_teacher_max:  fine-tuning only: the teacher pass draws r in [0, r_teacher_max).
    """

    r: Number = 16
    layers: Optional[Tuple[int, ...]] = tuple(range(1, 12))
    tau_sim: float = 1.0
    tau_info: float = 20.0
    tau_size: float = 40.0
    bidirectional: bool = True
    one_step_ahead: int = 1
    pooling: int = 1
    prop_attn: bool = True
    trace_source: bool = False
    r_teacher_max: Number = 0
    preset_layers: Optional[str] = None

    def __post_init__(self) -> None:
        if not _finite_number(self.r) or self.r < 0:
            raise ValueError(f"r must be a finite number >= 0 (count, or fraction < 1), got {self.r!r}")
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
                raise ValueError(f"layers must be a sequence of block indices or None (every block), "
                                 f"got {self.layers!r}; for one block write ({self.layers!r},)")
            layers = tuple(self.layers)
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise ValueError(f"layers must be non-negative block indices, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))
        if self.preset_layers is not None:
            if self.preset_layers not in PRESETS:
                raise ValueError(f"preset_layers must be one of {PRESETS} or None, got {self.preset_layers!r}")
            if self.layers is not None:
                raise ValueError("give layers or preset_layers (with layers=None), not both")
        for name in ("tau_sim", "tau_info", "tau_size"):
            tau = getattr(self, name)
            if not _finite_number(tau) or tau < 0:
                raise ValueError(f"{name} must be a finite number >= 0 (0 disables the criterion), got {tau!r}")
        # 1.0 == 1: a float would pass a membership test but is not a mode
        if not _int(self.one_step_ahead) or self.one_step_ahead not in (0, 1, 2):
            raise ValueError(f"one_step_ahead must be the int 0, 1 or 2, got {self.one_step_ahead!r}")
        if not _int(self.pooling) or self.pooling not in (0, 1, 2, 3):
            raise ValueError(f"pooling must be the int 0 (size), 1 (attention-and-size), 2 (max) or 3 (mean), "
                             f"got {self.pooling!r}")
        if not _finite_number(self.r_teacher_max) or self.r_teacher_max < 0:
            raise ValueError(f"r_teacher_max must be a finite number >= 0, got {self.r_teacher_max!r}")
        for name in ("bidirectional", "prop_attn", "trace_source"):
            object.__setattr__(self, name, bool(getattr(self, name)))

    @classmethod
    def preset(cls, name: str, depth: Optional[int] = None, **overrides) -> "MCTFConfig":
        """``"mctf"``: r=16 on every block but the first; ``"mctf-fast"``: r=0.35 on every
        (depth // 4)-th block (3, 6, 9 of 12). Without ``depth`` the blocks are resolved
        against the model's depth when it is patched (1..23 on a 24-block ViT-L), as the
        CLIs do; with it they are fixed now. ``overrides`` replace fields."""
        key = name.lower().replace("_", "-") if isinstance(name, str) else name
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose 'mctf' or 'mctf-fast'")
        base = dict(r=16 if key == "mctf" else 0.35)
        if depth is None:
            base.update(preset_layers=key, layers=None)
        else:
            base["layers"] = _preset_blocks(key, depth)
        if "layers" in overrides:
            base["preset_layers"] = None
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_mctf_type(cls, values: Sequence[Number], activate_layer: Optional[Sequence[int]] = None) -> "MCTFConfig":
        """Build from the public code's ``--mctf_type`` list (10 or 11 entries) and ``--activate_layer``."""
        values = list(values)
        if len(values) not in (10, 11):
            raise ValueError(f"mctf_type must have 11 entries {MCTF_TYPE_FIELDS}, got {len(values)}")
        r, r_teacher_max, trace, prop, osa, tau_sim, tau_info, tau_size, bidir, pooling = values[:10]
        return cls(
            r=r, r_teacher_max=r_teacher_max, trace_source=bool(trace), prop_attn=bool(prop),
            one_step_ahead=int(osa), tau_sim=tau_sim, tau_info=tau_info, tau_size=tau_size,
            bidirectional=bool(bidir), pooling=int(pooling),
            layers=None if activate_layer is None else tuple(activate_layer),
        )

    def to_mctf_type(self) -> list:
        """The public code's 11-entry list for this configuration."""
        return [self.r, self.r_teacher_max, int(self.trace_source), int(self.prop_attn), self.one_step_ahead,
                self.tau_sim, self.tau_info, self.tau_size, int(self.bidirectional), self.pooling, 0]

    def replace(self, **changes) -> "MCTFConfig":
        if "layers" in changes and "preset_layers" not in changes:
            changes["preset_layers"] = None  # explicit blocks replace the preset's rule
        return dataclasses.replace(self, **changes)

    def for_depth(self, depth: int) -> "MCTFConfig":
        """This configuration with its blocks fixed for a ``depth``-block model."""
        return self.replace(layers=self.active_layers(depth))

    def active_layers(self, depth: int) -> Tuple[int, ...]:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        if self.preset_layers is not None:
            return _preset_blocks(self.preset_layers, depth)
        layers = tuple(range(depth)) if self.layers is None else self.layers
        bad = [i for i in layers if i >= depth]
        if bad:
            raise ValueError(f"layers {bad} do not exist: the model has {depth} blocks (0..{depth - 1})")
        return layers


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _preset_blocks(key: str, depth: int) -> Tuple[int, ...]:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1, got {depth!r}")
    if key == "mctf":
        return tuple(range(1, depth))
    step = max(depth // 4, 1)
    return tuple(range(step, depth, step))


@dataclasses.dataclass(frozen=True)
class ToMeConfig:
    """Token Merging (ToMe, Bolya et al., ICLR 2023) on the same ops (docs/algorithm.md,
    "ToMe mode"): in every block, between the attention residual and the MLP, merge
    ``r`` tokens by the raw cosine of the keys averaged over heads (one-directional
    matching, size-weighted average).

    r:            tokens merged per block: an int for every block (shaped by
                  ``inflection``), or a sequence of ints, one per block (missing
                  trailing blocks merge nothing); each is capped at half the
                  mergeable tokens (``mctf_kernels.tome_tokens_to_remove``).
    inflection:   with an int ``r``, ToMe's schedule: 0 constant, -1 decreasing from
                  2r to 0, +1 increasing; any value in [-1, 1].
    prop_attn:    proportional attention (log token size added to the attention logits).
    trace_source: record which original patches each token holds (model.mctf_state.source).

    ``ToMeConfig.from_tome(r)`` reads ToMe's own ``model.r`` forms: an int, a list, or
    an ``(r, inflection)`` tuple.
    """

    r: Union[int, Tuple[int, ...]] = 16
    inflection: float = 0.0
    prop_attn: bool = True
    trace_source: bool = False

    def __post_init__(self) -> None:
        if _int(self.r):
            if self.r < 0:
                raise ValueError(f"r must be >= 0, got {self.r}")
        elif isinstance(self.r, (list, tuple)):
            if any(not _int(v) or v < 0 for v in self.r):
                raise ValueError(f"a per-block r must hold ints >= 0, got {self.r!r}")
            object.__setattr__(self, "r", tuple(self.r))
        else:
            raise ValueError(f"r must be an int or a sequence of ints (one per block), got {self.r!r}; "
                             f"for ToMe's (r, inflection) use ToMeConfig.from_tome or inflection=")
        if not _finite_number(self.inflection) or not -1 <= self.inflection <= 1:
            raise ValueError(f"inflection must be a number in [-1, 1], got {self.inflection!r}")
        if isinstance(self.r, tuple) and self.inflection != 0:
            raise ValueError("inflection shapes an int r; a per-block r takes no inflection")
        for name in ("prop_attn", "trace_source"):
            object.__setattr__(self, name, bool(getattr(self, name)))

    @classmethod
    def from_tome(cls, r, **overrides) -> "ToMeConfig":
        """From ToMe's ``model.r``: an int, a list (per block) or an ``(r, inflection)`` tuple."""
        if isinstance(r, tuple) and "inflection" in overrides:
            raise ValueError(f"from_tome({r!r}) already sets the inflection: give it once")
        if isinstance(r, tuple):
            if len(r) != 2:
                raise ValueError(f"ToMe's tuple form is (r, inflection), got {r!r}")
            return cls(r=r[0], inflection=r[1], **overrides)
        return cls(r=r, **overrides)

    def replace(self, **changes) -> "ToMeConfig":
        return dataclasses.replace(self, **changes)

    def for_depth(self, depth: int) -> "ToMeConfig":
        """This configuration, checked against a ``depth``-block model."""
        self.schedule(depth)
        return self

    def schedule(self, depth: int) -> Tuple[int, ...]:
        """The r of every block, before the per-layer cap (ToMe's own rule for the
        inflection: ``int(lo + i * (hi - lo) / (depth - 1))`` from ``lo = int(r (1 - inflection))``
        to ``hi = 2 r - lo``)."""
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        if isinstance(self.r, tuple):
            if len(self.r) > depth:
                raise ValueError(f"r has {len(self.r)} entries but the model has {depth} blocks")
            return self.r + (0,) * (depth - len(self.r))
        lo = int(self.r * (1.0 - self.inflection))
        hi = 2 * self.r - lo
        step = (hi - lo) / (depth - 1) if depth > 1 else 0.0
        return tuple(int(lo + step * i) for i in range(depth))
