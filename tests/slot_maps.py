"""Slot maps for kernel tests (shared by the merge and attention test files)."""
import torch

import mctf_kernels as mk


def make_dest(kind: str, B: int, T: int, device) -> tuple:
    """A slot map (B, T) and T'. ``kind`` is "random" (every slot gets at least one
    token) or "<bi|uni>-<num_protected>" (from the reference matcher on random tokens)."""
    if kind == "random":
        t_out = max(1, (2 * T) // 3)
        # surjective: a permutation of all slots, then random slots, shuffled
        rows = []
        for _ in range(B):
            slots = torch.cat([torch.randperm(t_out), torch.randint(0, t_out, (T - t_out,))])
            rows.append(slots[torch.randperm(T)])
        return torch.stack(rows).to(device), t_out
    bidirectional, num_protected = kind.split("-")
    num_protected = int(num_protected)
    r = (T - num_protected) // 3 if T > 5 else (T - num_protected) // 2
    dest = mk.match_reference(torch.randn(B, T, 32, device=device), r, torch.rand(B, T, device=device), None,
                              num_protected=num_protected, bidirectional=bidirectional == "bi")
    return dest, T - r
