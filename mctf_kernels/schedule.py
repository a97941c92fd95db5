"""How many tokens a fusion layer removes (docs/algorithm.md, "How many tokens a layer removes").

Everything here is plain Python on ints: the token count after every layer is
known before any data is seen, so shapes stay static (CUDA graphs, torch.compile).
"""
from __future__ import annotations

import math
from typing import Union

Number = Union[int, float]


def _check_token_counts(num_tokens: int, num_protected: int) -> None:
    for name, value in (("num_tokens", num_tokens), ("num_protected", num_protected)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if num_protected < 0 or num_protected > num_tokens:
        raise ValueError(f"num_protected must be in [0, num_tokens={num_tokens}], got {num_protected}")


def tokens_to_remove(num_tokens: int, r: Number, num_protected: int = 1) -> int:
    """Effective number of tokens a layer removes from ``num_tokens`` tokens.

    ``r`` is either a count (``r >= 1``) or a fraction of the mergeable tokens
    (``0 <= r < 1``). Mirrors the public code's rules, quirks included:

    1. if ``T - r < 10`` then ``r = T - 10`` (also for fractional r);
    2. fractional r becomes ``int((T - n_p) * r)``; then ``r = min(r, (T - n_p) // 2)``;
    3. a non-positive result means the layer does nothing (0).
    """
    if isinstance(r, bool) or not isinstance(r, (int, float)):
        raise TypeError(f"r must be an int or float, got {type(r).__name__}")
    # comparisons, not math.isfinite: torch.compile may trace r as a symbolic float
    if not 0 <= r < math.inf:  # NaN fails every comparison
        raise ValueError(f"r must be >= 0 and finite, got {r}")
    _check_token_counts(num_tokens, num_protected)
    if num_tokens - r < 10:
        r = num_tokens - 10  # quirk: applied before the fraction is resolved
    mergeable = num_tokens - num_protected
    r = int(mergeable * r) if r < 1 else int(r)
    r = min(r, mergeable // 2)
    return max(r, 0)


def tome_tokens_to_remove(num_tokens: int, r: int, num_protected: int = 1) -> int:
    """Tokens a Token Merging (ToMe) layer removes (docs/algorithm.md, "ToMe mode"):
    ``min(r, (T - n_p) // 2)``, nothing when that is not positive. ``r`` is an int;
    unlike ``tokens_to_remove`` there is no ``T - r < 10`` rule and no fraction."""
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, got {r!r}")
    _check_token_counts(num_tokens, num_protected)
    return max(min(r, (num_tokens - num_protected) // 2), 0)


def split_directions(r: int, bidirectional: bool) -> tuple[int, int]:
    """Tokens merged in stage 1 (A -> B) and stage 2 (B -> unmerged A)."""
    if bidirectional:
        r1 = r // 2
        return r1, r - r1
    return r, 0
