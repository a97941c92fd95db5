"""Per-forward state shared by the blocks of one patched model."""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch

from mctf_kernels import tokens_to_remove, tome_tokens_to_remove


@dataclasses.dataclass
class MCTFState:
    """What a patched model knows during and after a forward (reset at every forward).

    size:             (B, T) float32 number of original patches in each token, or None
                      before the first fusion (all ones).
    source:           (B, T, T_input) 0/1 map of original tokens per token when
                      ``trace_source`` is on, else None.
    tokens_per_block: token count after every block of the last forward.
    r_override:       if set, used instead of ``config.r`` (e.g. the teacher pass).
    """

    config: "object"
    num_protected: int
    depth: int
    active: frozenset = frozenset()
    size: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None
    tokens_per_block: List[int] = dataclasses.field(default_factory=list)
    r_override: Optional[float] = None

    def reset(self) -> None:
        self.size = None
        self.source = None
        self.tokens_per_block = []

    def r_for_block(self, index: int, num_tokens: int) -> int:
        """Tokens block ``index`` removes from ``num_tokens`` (0 when inactive)."""
        if index not in self.active:
            return 0
        r = self.config.r if self.r_override is None else self.r_override
        return tokens_to_remove(num_tokens, r, self.num_protected)

    def planned_tokens(self, num_tokens: int) -> List[int]:
        """Token count after every block, known before any data (static shapes)."""
        counts = []
        for i in range(self.depth):
            num_tokens -= self.r_for_block(i, num_tokens)
            counts.append(num_tokens)
        return counts


@dataclasses.dataclass
class ToMeState(MCTFState):
    """``MCTFState`` of a ToMe-patched model: ``schedule`` holds every block's r
    (``ToMeConfig.schedule``), capped per block by ToMe's rule; ``r_override``, when
    set, is one int r for every block."""

    schedule: Tuple[int, ...] = ()

    def r_for_block(self, index: int, num_tokens: int) -> int:
        r = self.schedule[index] if self.r_override is None else self.r_override
        return tome_tokens_to_remove(num_tokens, r, self.num_protected)
