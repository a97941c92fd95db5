"""Launcher of the fused score-and-match kernels: same contract as
``mctf_kernels.match.match_reference`` (slot map ``dest`` (B, T) int64).

T <= 256 (t1, t2 <= configs.MATCH_FUSED_MAX_HALF): ONE launch, one program per
image (``_match_fused_kernel``). Larger T: the tiled path, one launch per stage
(token stats, row max, rank of A, column max when bidirectional, slot assignment).
No host sync, no data-dependent shapes. ``return_slots=True`` also returns the map's
slot index (``mctf::match_slots``): the single launch writes it itself (no slot-index
kernel); the tiled path adds one ``_slot_index_kernel`` launch.

Compute dtype of the similarity (docs/algorithm.md, "Precision"): the autocast
dtype when autocast is enabled for x's device type, else x's dtype when it is
float16/bfloat16, else float32 (the exact path). ``match_triton`` reads it outside
the custom op and passes it in, so a traced graph keeps it as a constant; it is the
same rule as ``mctf_kernels.scores.compute_dtype``, which the reference follows.
"""
from __future__ import annotations

import contextlib
import struct
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from .._checks import check_per_token, check_temperature, check_tokens
from ..dispatch import interpreter_enabled
from ..match import _check_r
from ..schedule import split_directions
from ..scores import check_score, compute_dtype
from ..slots import SlotIndex
from . import LAUNCHERS
from . import _match_kernel as K
from ._common import custom_op, wrap
from .configs import gpu_configs, match_configs, sm_count
from .slots import launch_slot_index

# Ranks, positions and slots are int32 inside the kernels; 2**16 tokens keeps
# every count far from overflow and is well beyond ViT sequence lengths.
MAX_TOKENS = 65536

# Python-side count of kernel launches, so tests can tell the kernels ran
# (it counts launches traced by torch.compile only once, at trace time).
launch_count = 0



def _pow_mode(tau: float, active: bool) -> tuple[int, float]:
    """Kernel pow mode and float32 exponent for a temperature, as torch's pow
    special-cases the exponent (it rounds a Python float exponent to float32)."""
    if not tau or not active:
        return K.POW_OFF, 1.0
    e = struct.unpack("f", struct.pack("f", 1.0 / tau))[0]  # round to float32
    mode = {1.0: K.POW_ONE, 0.5: K.POW_SQRT, 2.0: K.POW_SQUARE, 3.0: K.POW_CUBE}.get(e, K.POW_GENERAL)
    return mode, e


def _launch(kernel, grid, *args, **meta):
    global launch_count
    launch_count += 1
    wrap(kernel)[grid](*args, **meta)


# compute dtype code passed to the custom op (a schema-friendly int)
_DOT_DTYPES = {0: tl.float32, 1: tl.float16, 2: tl.bfloat16}
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _match_launch(
    x: torch.Tensor, r: int, attn_received: Optional[torch.Tensor], size: Optional[torch.Tensor],
    tau_sim: float, tau_info: float, tau_size: float, num_protected: int, bidirectional: bool,
    dot_dtype: int, cosine: bool, with_slots: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """dest, and with ``with_slots`` its slot index (order, starts): written by the
    single-launch kernel itself; on the tiled path one slot-index launch after it."""
    B, T, C = x.shape
    t1, t2 = (T + 1) // 2, T // 2
    r1, r2 = split_directions(r, bidirectional)
    dev = x.device
    sim_mode, e_sim = (K.SIM_COSINE, 1.0) if cosine else _pow_mode(tau_sim, True)
    info_mode, e_info = _pow_mode(tau_info, attn_received is not None)
    size_mode, e_size = _pow_mode(tau_size, size is not None)
    half = dot_dtype != 0
    cfg = match_configs(gpu_configs(dev), t1, t2, C, T, half, B, sm_count(dev))
    # pow: libdevice powf (torch's own) on the exact fp32 path, MUFU log2/exp2 on the
    # half path, float64 under the interpreter (no libdevice there)
    use_libdevice = 0 if dev.type != "cuda" or interpreter_enabled() else (1 if half else 2)
    warps = {k: cfg[k] for k in ("num_warps", "num_stages", "maxnreg") if cfg.get(k) is not None}
    numerics = dict(SIM_MODE=sim_mode, INFO_MODE=info_mode, SIZE_MODE=size_mode,
                    HAS_PROT=num_protected > 0, USE_LIBDEVICE=use_libdevice,
                    HALF=half, DOT_DTYPE=_DOT_DTYPES[dot_dtype])
    blocks = dict(BLOCK_A=cfg["BLOCK_A"], BLOCK_B=cfg["BLOCK_B"], BLOCK_C=cfg["BLOCK_C"])

    dest = torch.empty(B, T, device=dev, dtype=torch.int64)
    order = starts = None
    # Absent optional inputs: any tensor as a never-read pointer.
    attn = attn_received if attn_received is not None else x
    sz = size if size is not None else x
    sab, sat = (attn.stride(0), attn.stride(1)) if attn_received is not None else (0, 0)
    ssb, sst = (sz.stride(0), sz.stride(1)) if size is not None else (0, 0)
    sxb, sxt, sxc = x.stride()
    taus = (e_sim, e_info, e_size)
    block_p = max(16, min(64, triton.next_power_of_2(max(num_protected, 1))))

    ctx = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with ctx:
        if cfg["fused"]:
            # per-image scratch: the score matrix (column pass only), keys, row argmax/positions
            scores = torch.empty(B, t1, t2, device=dev, dtype=torch.float32) if bidirectional else dest
            keys = torch.empty(B, T, device=dev, dtype=torch.float32)
            aux = torch.empty(B, 2, t1, device=dev, dtype=torch.int32)
            if with_slots:
                order = torch.empty(B, T, device=dev, dtype=torch.int64)
                starts = torch.empty(B, T - r + 1, device=dev, dtype=torch.int64)
            _launch(K._match_fused_kernel, (B,),
                    x, attn, sz, scores, keys, aux, dest,
                    order if with_slots else dest, starts if with_slots else dest,  # else never written
                    T, t1, t2, C, r1, r2, num_protected,
                    sxb, sxt, sxc, sab, sat, ssb, sst, *taus, **numerics,
                    BIDIR=bool(bidirectional), REMAP=num_protected > 1, **blocks,
                    BLOCK_M=min(cfg["BLOCK_M"], blocks["BLOCK_A"]), BLOCK_J=cfg["BLOCK_J"],
                    BLOCK_P=block_p, WITH_SLOTS=bool(with_slots), **warps)
            return dest, order, starts
        stats = torch.empty(B, 3, T, device=dev, dtype=torch.float32)
        node_max = torch.empty(B, t1, device=dev, dtype=torch.float32)
        node_idx = torch.empty(B, t1, device=dev, dtype=torch.int32)
        rank_a = torch.empty(B, t1, device=dev, dtype=torch.int32)
        node_max2 = torch.empty(B, max(t2, 1), device=dev, dtype=torch.float32)
        node_idx2 = torch.empty(B, max(t2, 1), device=dev, dtype=torch.int32)
        bt = blocks["BLOCK_A"]
        _launch(K._token_stats_kernel, (B, triton.cdiv(T, bt)),
                x, attn, sz, stats, T, C, sxb, sxt, sxc, sab, sat, ssb, sst,
                HAS_INFO=info_mode != K.POW_OFF, HAS_SIZE=size_mode != K.POW_OFF,
                BLOCK_T=bt, BLOCK_C=blocks["BLOCK_C"], BLOCK_R=cfg["BLOCK_R"], **warps)
        _launch(K._row_max_kernel, (B, triton.cdiv(t1, blocks["BLOCK_A"])),
                x, stats, node_max, node_idx, t1, t2, T, C, num_protected, sxb, sxt, sxc, *taus,
                **numerics, **blocks, **warps)
        _launch(K._rank_kernel, (B, triton.cdiv(t1, blocks["BLOCK_A"])),
                node_max, rank_a, t1, BLOCK=blocks["BLOCK_A"], BLOCK_J=cfg["BLOCK_J"], **warps)
        if bidirectional:
            _launch(K._col_max_kernel, (B, triton.cdiv(t2, blocks["BLOCK_B"])),
                    x, stats, rank_a, node_max2, node_idx2, t1, t2, T, C, num_protected, r1,
                    sxb, sxt, sxc, *taus, **numerics, **blocks, **warps)
        _launch(K._assign_kernel, (B, triton.cdiv(T, bt)),
                rank_a, node_idx, node_max2, node_idx2, dest, T, t1, t2, r1, r2, num_protected,
                BIDIR=bool(bidirectional), HAS_PROT=num_protected > 0, REMAP=num_protected > 1,
                BLOCK_T=bt, BLOCK_J=cfg["BLOCK_J"], BLOCK_P=block_p, **warps)
        if with_slots:  # the tiled stages never hold a whole image's map: one more launch
            order, starts = launch_slot_index(dest, T - r)
    return dest, order, starts


def _match_impl(
    x: torch.Tensor, r: int, attn_received: Optional[torch.Tensor], size: Optional[torch.Tensor],
    tau_sim: float, tau_info: float, tau_size: float, num_protected: int, bidirectional: bool,
    dot_dtype: int, cosine: bool = False,
) -> torch.Tensor:
    return _match_launch(x, r, attn_received, size, tau_sim, tau_info, tau_size, num_protected,
                         bidirectional, dot_dtype, cosine, False)[0]


def _match_slots_impl(
    x: torch.Tensor, r: int, attn_received: Optional[torch.Tensor], size: Optional[torch.Tensor],
    tau_sim: float, tau_info: float, tau_size: float, num_protected: int, bidirectional: bool,
    dot_dtype: int, cosine: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dest, order, starts = _match_launch(x, r, attn_received, size, tau_sim, tau_info, tau_size, num_protected,
                                        bidirectional, dot_dtype, cosine, True)
    return dest, order, starts


# custom ops whose bodies torch.compile traces into (kernels via wrap_triton): the slot map
# alone (``mctf::match``, its schema unchanged), and the map with its slot index
_match_op = custom_op("match", _match_impl)
_match_slots_op = custom_op("match_slots", _match_slots_impl)


def match_triton(
    x: torch.Tensor,
    r: int,
    attn_received: Optional[torch.Tensor] = None,
    size: Optional[torch.Tensor] = None,
    *,
    tau_sim: float = 1.0,
    tau_info: float = 20.0,
    tau_size: float = 40.0,
    num_protected: int = 1,
    bidirectional: bool = True,
    score: str = "mctf",
    return_slots: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, SlotIndex]]:
    """Fused score-and-match; equals ``match_reference`` (slot map (B, T) int64):
    exactly for float32, up to near-ties in half precision (docs/algorithm.md, "Precision").
    ``score="cosine"``: ToMe's raw cosine (no attn_received, no size).
    ``return_slots``: (dest, ``SlotIndex``), the index equal to ``slot_index_reference(dest,
    T - r)``, from the matcher's own launch for T <= 256 (docs/algorithm.md, "Matching")."""
    check_tokens("x", x)
    B, T, C = x.shape
    _check_r(r, T, num_protected)
    check_per_token("attn_received", attn_received, B, T, x.device)
    check_per_token("size", size, B, T, x.device)
    for name, tau in (("tau_sim", tau_sim), ("tau_info", tau_info), ("tau_size", tau_size)):
        check_temperature(name, tau)
    check_score(score)
    cosine = score == "cosine"
    if cosine and (attn_received is not None or size is not None):
        raise ValueError("score='cosine' uses neither attn_received nor size: pass None")
    if r == 0:
        ident = torch.arange(T, device=x.device).expand(B, T).clone()
        if return_slots:  # every token its own slot, in order
            return ident, SlotIndex(ident.clone(), torch.arange(T + 1, device=x.device).expand(B, T + 1).clone())
        return ident
    if not 0 <= num_protected <= T:
        raise ValueError(f"num_protected must be in [0, T={T}], got {num_protected}")
    if T > MAX_TOKENS:
        raise ValueError(f"the Triton match kernel supports T <= {MAX_TOKENS} tokens, got T={T}")
    if C < 1 or B < 1:
        raise ValueError(f"x must have B >= 1 and C >= 1, got shape {tuple(x.shape)}")
    if x.device.type == "cpu" and not interpreter_enabled():
        raise ValueError("the Triton match kernel needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
    args = (x, r, attn_received, size, float(tau_sim), float(tau_info), float(tau_size),
            int(num_protected), bool(bidirectional), _DTYPE_CODES[compute_dtype(x)], cosine)
    if return_slots:
        dest, order, starts = _match_slots_op(*args)
        return dest, SlotIndex(order, starts)
    return _match_op(*args)


LAUNCHERS["match"] = match_triton
