"""Every launch configuration (block sizes, warps, stages) of every kernel, in one place.

A launcher asks ``gpu_configs(device)`` which policy applies: the GPU's on CUDA
tensors, the interpreter's (few, large programs: each op costs Python time, not
FLOPs) on CPU tensors. Tests run the GPU policy under the interpreter with
``force_gpu_configs()``, so the tile loops that run on a GPU are checked on CPU too.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import triton

_forced_gpu = 0


@contextlib.contextmanager
def force_gpu_configs() -> Iterator[None]:
    """Use the GPU launch configurations for CPU tensors too (interpreter tests)."""
    global _forced_gpu
    _forced_gpu += 1
    try:
        yield
    finally:
        _forced_gpu -= 1


def gpu_configs(device: torch.device) -> bool:
    """True when launches on ``device`` use the GPU configurations."""
    return device.type == "cuda" or _forced_gpu > 0


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; an H100's 132 for the GPU policy forced on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


# ---------------------------------------------------------------- match
# Largest A/B half handled by the single-launch kernel (one program per image,
# scores computed once, BLOCK_M rows at a time). T <= 256,
# every 224 px /16 model (T = 197 and fewer), takes that path.
MATCH_FUSED_MAX_HALF = 128


def match_configs(gpu: bool, t1: int, t2: int, C: int, T: int, half: bool,
                  B: int = 1, sms: int = 132) -> dict:
    """Launch configuration of the matcher: ``fused`` (one launch per image) or the
    tiled path, block sizes, warps and stages. ``B`` images on ``sms`` SMs.

    GPU (sm_90 compiles at DeiT-S and ViT-L/16@384 shapes, preset temperatures;
    times are the static report's estimates, bench/NOTES.md section 3):
    - fused, 16 warps: 64 score rows per step, channel chunks of 64 (half, tensor
      cores; 32 for halves <= 32, where 64 spills) or 16 (fp32 FMA dot), rank keys in
      chunks of 32, one stage: <= 128 registers, no spills, one 16-warp CTA per SM
      (25%). Against 32-channel chunks and 16-key rank chunks, ~40% fewer instructions
      per image (estimate); rank chunks of 64 spill; 8 warps at 128-wide halves spill.
      ``maxnreg=128`` (all a 512-thread CTA can hold): left to itself ptxas kept 64
      registers and spilled 20-44 B at fp32 halves of 27-60 and 32 B in the cosine mode
      at T = 54 (DeiT-S, ptxas -v); capped at 128 it took 62-106, no spills.
    - fused, halves <= 64 (T <= 128; fp32: <= 32) with more images than SMs: 8 warps,
      32 score rows per step, channel chunks of 64 (half) or 16, rank chunks of 32:
      <= 127 registers, no spills, two CTAs per SM, fewer warp-instructions per image
      than 16 warps (fp32 at 64-wide halves spills 212 B: 16 warps there). With at most
      one image per SM (batch 1) a lone 8-warp CTA cannot hide latency: 16 warps.
    - the tiled path (4-5 launches, more programs per image) is not chosen for small
      batches: at batch 1 it is estimated only ~1% faster over a DeiT-S forward
      (the row and column kernels still loop over all of the other half and all
      channels per program; smaller tiles are slower) for 4 more kernels per layer.
    - tiled: 64 x 64 score tiles, 16 warps, one stage: 64-124 registers, no spills,
      25-50% occupancy (4 warps: 255 registers with spills, 12.5%).
    Interpreter: the largest blocks (each op costs Python time, not FLOPs)."""
    def p2(n: int) -> int:
        return 1 << max(n - 1, 0).bit_length()

    fused = max(t1, t2) <= MATCH_FUSED_MAX_HALF
    width = p2(max(t1, t2))
    if gpu and fused and width <= (64 if half else 32) and B > sms:
        tile, rows, chunk, rank, warps, stages = 128, 32, 64 if half else 16, 32, 8, 1
    elif gpu and fused:
        chunk = (64 if width >= 64 else 32) if half else 16
        tile, rows, rank, warps, stages = 128, 64, 32, 16, 1
    elif gpu:
        tile, rows, chunk, rank, warps, stages = 64, 64, 64 if half else 32, 128, 16, 1
    else:
        tile, rows, chunk, rank, warps, stages = 128, 128, 256, 256, None, None
    if gpu and fused and max(t1, t2) <= 16:
        # T <= 32 (late ToMe blocks): a 16 x 16 tile over 16 warps spilled 44 B at T = 21
        # on sm_90 (ptxas -v); 4 warps: 40 registers, no spills
        warps = 4
    cfg = dict(
        fused=fused,
        BLOCK_A=max(16, min(tile, p2(t1))),
        BLOCK_B=max(16, min(tile, p2(t2))),
        BLOCK_M=rows,
        BLOCK_C=max(16, min(chunk, p2(C))),
        BLOCK_J=max(16, min(rank, p2(T))),
        num_warps=warps,
        num_stages=stages,
        maxnreg=128 if gpu and fused and warps == 16 else None,
    )
    cfg["BLOCK_R"] = cfg["BLOCK_J"]
    return cfg



# ---------------------------------------------------------------- merge and slot index

def slot_index_config(device: torch.device, T: int, t_out: int) -> dict:
    """``_slot_index_kernel``: BLOCK_I tokens ranked per program against BLOCK_J-wide tiles."""
    if not gpu_configs(device):  # one program per image: the interpreter pays per program
        n = triton.next_power_of_2(max(T, t_out + 1))
        return dict(BLOCK_I=n, BLOCK_J=n, num_warps=4)
    # 32 x 128 int32 compares per step: 32 values per thread at 4 warps
    return dict(BLOCK_I=32, BLOCK_J=128, num_warps=4)


def merge_row_chunks(C: int) -> tuple:
    """(BLOCK_C, NCHUNK): a whole row of C channels as NCHUNK <= 8 chunks of a power of two
    that divides C (C = 384: 3 x 128, no padded lanes, no channel masks), else one chunk
    padded to a power of two (C = 100: 128)."""
    full = triton.next_power_of_2(max(C, 16))
    chunk = C & -C  # the largest power of two dividing C
    if full != C and chunk >= 16 and C // chunk <= 8:
        return chunk, C // chunk
    return full, 1


def merge_config(device: torch.device, rows: int, T: int, t_out: int, C: int, N: int,
                 whole_rows: bool = False) -> dict:
    """``_merge_kernel``: BLOCK_S slots x BLOCK_C channels per step, channels looped.

    ``rows`` is the number of (image, head) rows, N the source width (0: none).
    BLOCK_C is the largest power of two up to 128 that divides C (no idle lanes at
    C = 192, 384, 768, ...). Four slots per program: on sm_90 the kernel's registers
    grow with the slots per program, not the channels (ptxas, 4 warps, fp16: 4 slots 48
    registers, 8 slots 110, 16 slots ~200 with spills in max pooling). Two warps (48
    registers, 62.5% occupancy): every warp repeats the slots' scalar work, so 4 warps issue
    ~80% more (DeiT-S fp16 B = 256, static estimate: ~24 us issue against ~28 us memory on 2
    warps, ~45 us issue on 4). When the grid is small (batch 1) the channels are split across
    programs (SPLIT_C) to fill the GPU.
    ``whole_rows`` (the LayerNorm of x' folded in): no split, each program holds its
    slots' whole rows as NCHUNK chunks of BLOCK_C channels (``merge_row_chunks``).
    """
    if whole_rows:
        block_c, nchunk = merge_row_chunks(C)
        if not gpu_configs(device):
            return dict(BLOCK_S=min(64, triton.next_power_of_2(max(t_out, 1))), BLOCK_C=block_c, NCHUNK=nchunk,
                        BLOCK_N=triton.next_power_of_2(max(N, 16)), BLOCK_T=triton.next_power_of_2(max(T, 16)),
                        SPLIT_C=1, num_warps=4)
        # sm_90 compiles (fp16, the LayerNorm at the tokens and the residual epilogue; the
        # static report's estimates, bench/sm90_report.py), by row width W = BLOCK_C * NCHUNK:
        # - W <= 256 (DeiT-T, C = 192: 3 x 64): 8 slots on 2 warps, 96 registers, 31%, ~20 us
        #   issue against ~22 us memory at B = 256 (4 slots: ~34 us issue, issue-bound).
        # - W <= 512 (C = 384: 3 x 128): 4 slots on 2 warps, 96 registers, no spills, 31%
        #   occupancy; DeiT-S B = 256 ~40 us issue against ~43 us memory (one padded 512-wide
        #   chunk on 4 warps: ~95 us issue). 4 warps issue 60% more (every warp repeats the
        #   slots' scalar work); 1 warp takes 158 registers; 8 slots on 2 warps 148 (19%).
        # - W = 768 (3 x 256): 8 slots on 8 warps, 107 registers, 25%, memory-bound; 4 slots on
        #   4 warps spill 8 B, on 2 warps take 147 registers (19%).
        # - W >= 1024 (ViT-L): 4 slots on 4 warps, 80 registers, 37.5%, no spills; ViT-L/16@384
        #   B = 32 ~48 us issue against ~42 us memory (2 warps: memory-bound but 168
        #   registers, 19% occupancy).
        # With fewer programs than SMs (batch 1) the longest program sets the time: 2 slots.
        width = block_c * nchunk
        block_s, warps = ((8, 2) if width <= 256 else (4, 2) if width <= 512 else (8, 8) if width <= 768
                          else (4, 8 if width > 1024 else 4))
        if width <= 512 and rows * triton.cdiv(t_out, block_s) < sm_count(device):
            block_s = 2
        return dict(BLOCK_S=block_s, BLOCK_C=block_c, NCHUNK=nchunk, BLOCK_N=128, BLOCK_T=128,
                    SPLIT_C=1, num_warps=warps)
    if not gpu_configs(device):
        return dict(BLOCK_S=min(64, triton.next_power_of_2(max(t_out, 1))), BLOCK_C=triton.next_power_of_2(max(C, 16)),
                    BLOCK_N=triton.next_power_of_2(max(N, 16)), BLOCK_T=triton.next_power_of_2(max(T, 16)),
                    SPLIT_C=1, num_warps=4)
    block_c = 128
    while block_c > 16 and C % block_c:
        block_c //= 2
    block_s = 4
    chunks = triton.cdiv(C, block_c)
    split = 1
    min_programs = 2 * sm_count(device)  # fewer programs than this leave SMs idle
    while split < chunks and rows * triton.cdiv(t_out, block_s) * split < min_programs:
        split *= 2
    return dict(BLOCK_S=block_s, BLOCK_C=block_c, BLOCK_N=128, BLOCK_T=128, SPLIT_C=min(split, chunks),
                num_warps=2)


def merge_backward_config(device: torch.device, rows: int, T: int, C: int, mode: int = 1) -> dict:
    """``_merge_backward_kernel``: BLOCK_T tokens x BLOCK_C channels per step, channels
    looped (BLOCK_C as ``merge_config``: the largest power of two up to 128 dividing C),
    BLOCK_R sizes per step of the row's size maximum. On sm_90 (fp16, C = 384) the
    registers follow the tile's elements per thread (each holds a 64-bit address): 16 x 128
    on 4 warps takes 196 registers (12.5% occupancy; max pooling spills), 8 x 128 on 8
    warps 48 (62.5%); max pooling, which also walks the slot's members, 4 x 128 on 4 warps
    64 (50%). The channels split across programs (SPLIT_C) when the grid would leave SMs
    idle (batch 1)."""
    if not gpu_configs(device):  # the interpreter pays per program: few, large ones
        return dict(BLOCK_T=min(256, triton.next_power_of_2(max(T, 16))),
                    BLOCK_C=triton.next_power_of_2(max(C, 16)), BLOCK_R=triton.next_power_of_2(max(T, 16)),
                    SPLIT_C=1, num_warps=4)
    block_c = 128
    while block_c > 16 and C % block_c:
        block_c //= 2
    block_t, warps = (4, 4) if mode == 2 else (8, 8)
    chunks = triton.cdiv(C, block_c)
    split = 1
    while split < chunks and rows * triton.cdiv(T, block_t) * split < 2 * sm_count(device):
        split *= 2
    return dict(BLOCK_T=block_t, BLOCK_C=block_c, BLOCK_R=128, SPLIT_C=min(split, chunks), num_warps=warps)


# ---------------------------------------------------------------- attention
# Half precision: 64-row query tiles (one Hopper warpgroup MMA has M = 64). Both
# kernels keep their fp32 tiles in registers; the sizes below are spill-free on sm_90
# (compiled as tests/aot_sm90.py does, unit strides specialised as the JIT does).
# float32 dots run on FMA units with operands in registers, hence smaller tiles.

#: largest key row the received kernel holds on chip in one tile (one q.k^T pass)
ATTENTION_ONE_TILE_MAX_T = 256


def attention_received_qk_config(T: int, D: int, gpu: bool, wide_dtype: bool = False, batch: int = 1,
                                 sms: int = 132) -> dict:
    """``_attention_lse_received_kernel``: queries per program, keys per tile, head-dim
    block, warps, whether the whole key row is one tile (T <= 256: q.k^T once), and
    whether one program per image writes ``received`` (``PER_IMAGE``: no partials, no
    separate sum launch; taken when the batch gives every SM an image, ``batch >= sms``;
    below that the per-(head, query block) grid keeps small batches parallel; half
    precision with D <= 64 only), and launch
    options ``num_stages`` / ``maxnreg`` (None: Triton's default). ``wide_dtype``:
    float32/float64 q, k (FMA dots, operands in registers: smaller tiles)."""
    block_d = max(16, triton.next_power_of_2(D))
    if not gpu:  # interpreter: fewest, largest programs
        block_n = max(16, min(triton.next_power_of_2(T), 1024))
        return dict(BLOCK_M=128, BLOCK_N=block_n, BLOCK_D=block_d, ONE_TILE=T <= block_n, PER_IMAGE=T <= block_n,
                    num_warps=4, num_stages=None, maxnreg=None)
    # sm_90, fp16, D = 64: one tile (64 x 256 logits) on 8 warps is 25% occupancy with
    # no spills; the two-loop form on 8 warps 50% (4 warps: 37.5%).
    if T <= ATTENTION_ONE_TILE_MAX_T and block_d <= 128:
        block_n = max(16, triton.next_power_of_2(T))
        per_image = batch >= sms and block_d <= 64 and not wide_dtype
        # One program per image (DeiT-S fp16): its loop, pipelined or left to ptxas, takes
        # 160-230 registers (1 CTA/SM); one stage capped at 128 has no spills at the
        # model's specialisations: 25%. float32 (FMA dots) spills there: partials.
        return dict(BLOCK_M=32 if wide_dtype else 64, BLOCK_N=block_n, BLOCK_D=block_d, ONE_TILE=True,
                    PER_IMAGE=per_image, num_warps=8 if block_n > 128 else 4,
                    num_stages=1 if per_image else None, maxnreg=128 if per_image else None)
    return dict(BLOCK_M=64, BLOCK_N=64 if block_d <= 64 and not wide_dtype else 32, BLOCK_D=block_d,
                ONE_TILE=False, PER_IMAGE=False, num_warps=8, num_stages=None, maxnreg=None)


def gather_values_config(T: int, D: int, gpu: bool) -> dict:
    """``_gather_values_kernel``: tokens per program, head-dim block, warps. A copy: 32
    tokens x one head's D channels per step on 4 warps (16 fp16 values per thread at
    D = 64); the interpreter takes every token in one program."""
    block_d = max(16, triton.next_power_of_2(D))
    if not gpu:
        return dict(BLOCK_T=max(16, triton.next_power_of_2(T)), BLOCK_D=block_d, num_warps=4)
    return dict(BLOCK_T=32, BLOCK_D=block_d, num_warps=4)


def attention_output_config(D: int, gpu: bool, wide_dtype: bool = False) -> dict:
    """``_fused_attention_output_kernel`` (P read from memory): query rows per tile (in slot
    order), keys per step, head-dim block, the block of the size-max scan, warps, the
    register cap (``maxnreg``, None: ptxas's choice). ``wide_dtype``: float32
    or float64 values (FMA dots: 32 x 32 tiles, 182 registers on 8 warps, no spills)."""
    block_d = max(16, triton.next_power_of_2(D))
    if not gpu:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=block_d, BLOCK_T=1024, num_warps=4, maxnreg=None)
    # 8 warps (two warpgroups). Left to itself ptxas takes 216 registers at D = 64 on
    # sm_90 (fp16, attention-and-size pooling): 1 CTA/SM = 12.5% occupancy. Capped at 128,
    # HGMMA is kept and 2 CTAs fit (25%) for a 4-byte spill (ptxas -v; 96 registers at
    # 8 warps spills more).
    if wide_dtype:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d, BLOCK_T=256, num_warps=8, maxnreg=None)
    return dict(BLOCK_M=64, BLOCK_N=32 if block_d > 64 else 64, BLOCK_D=block_d, BLOCK_T=256,
                num_warps=8, maxnreg=128)


# ---------------------------------------------------------------- attention backward

def attention_backward_config(D: int, D_QK: int, gpu: bool, wide_dtype: bool = False) -> dict:
    """``_attention_backward_kernel``'s three launches: ``dq`` (BLOCK_M queries per program,
    BLOCK_N keys per step), ``dkv`` (BLOCK_N keys per program, BLOCK_M queries per step),
    ``slot_sum`` (BLOCK_S slots per program); head-dim blocks and the size-max scan's
    block; ``maxnreg`` None: ptxas's choice. ``wide_dtype``: float32/float64 q, k (FMA
    dots, operands in registers: smaller tiles).

    sm_90 (tests/aot_sm90.py's compile, attention-and-size pooling with log sizes), all
    without spills: half, D <= 64: dq 64 x 32 and dkv 64 keys x 16 queries on 8 warps
    capped at 128 registers, 25% occupancy (uncapped: 240 / 194 registers, 12.5%; 64 x 64
    dq or 32-query dkv steps spill at 128); half, D = 128: 212 / 210 registers, 12.5%;
    float32, D <= 64: 111 / 98 registers, 25%; float32, D = 128: 152 / 125 registers.
    Interpreter: the largest blocks (each op costs Python time, not FLOPs)."""
    block_d = max(16, triton.next_power_of_2(D))
    block_dk = max(16, triton.next_power_of_2(D_QK))
    common = dict(BLOCK_D=block_d, BLOCK_DK=block_dk, BLOCK_R=1024 if not gpu else 256)

    def launch(m, n, warps, maxnreg=None):
        return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, maxnreg=maxnreg)

    if not gpu:
        return dict(common, dq=launch(128, 128, 4), dkv=launch(128, 128, 4), slot_sum=dict(BLOCK_S=64, num_warps=4))
    wide = max(block_d, block_dk) > 64
    if wide_dtype:
        dq, dkv = (launch(16, 16, 8), launch(16, 32, 8)) if wide else (launch(32, 16, 8), launch(16, 32, 8))
    elif wide:
        dq, dkv = launch(32, 32, 8), launch(16, 64, 8)
    else:
        dq, dkv = launch(64, 32, 8, 128), launch(16, 64, 8, 128)
    return dict(common, dq=dq, dkv=dkv, slot_sum=dict(BLOCK_S=16, num_warps=4))
