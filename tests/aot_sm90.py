"""Compile every Triton kernel for an H100 (sm_90) ahead of time, without a GPU.

The interpreter runs kernels as numpy and so misses errors that only the real
compiler sees (non-constexpr globals, shapes that do not broadcast in codegen,
register-hungry tiles). This script, run by tests/test_kernels_compile_sm90.py
in a process without TRITON_INTERPRET, compiles the kernels with the block
configs the launchers pick on a GPU, for each dtype and code-path option.
Exit 0: all compiled; 3: no CUDA compiler toolchain in this Triton install.
"""
import itertools
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from mctf_kernels.triton import _attention_backward_kernel as ABK  # noqa: E402
from mctf_kernels.triton import _attention_kernel as AK  # noqa: E402
from mctf_kernels.triton import _flash_attention_kernel as FK  # noqa: E402
from mctf_kernels.triton import _match_kernel as MK  # noqa: E402
from mctf_kernels.triton import _merge_backward_kernel as GBK  # noqa: E402
from mctf_kernels.triton import _merge_kernel as GK  # noqa: E402
from mctf_kernels.triton import _slots_kernel as SK  # noqa: E402
from mctf_kernels.triton.configs import match_configs, merge_backward_config, merge_config, slot_index_config  # noqa: E402

try:
    from triton.backends.compiler import GPUTarget
except ImportError:  # pragma: no cover
    sys.exit(3)

TARGET = GPUTarget("cuda", 90, 32)
# the GPU launch configurations for an H100 (132 SMs), chosen for a CPU tensor: no GPU is touched
GPU = torch.device("cpu")
FLOAT_SCALARS = {"scale", "e_sim", "e_info", "e_size"}
INT32_POINTERS = {"node_idx_ptr", "rank_a_ptr", "node_idx2_ptr", "aux_ptr"}
INT64_POINTERS = {"dest_ptr", "order_ptr", "starts_ptr"}


def compile_kernel(fn, constexprs, dtype="fp32", data_pointers=(), num_warps=4, num_stages=None, maxnreg=None):
    """Kernel arguments by the kernels' naming convention: ``*_ptr`` pointers (the
    ``data_pointers`` in ``dtype``), the temperatures/scale fp32, every other scalar i32."""
    # constexprs left out take their defaults, as a launch would (not i32 arguments)
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **constexprs}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            kind = "i32" if name in INT32_POINTERS else "i64" if name in INT64_POINTERS else (
                dtype if name in data_pointers else "fp32")
            signature[name] = "*" + kind
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    compiled = triton.compile(src, target=TARGET, options=options)
    assert compiled.asm["cubin"], fn.__name__
    return compiled


def compile_backward_kernels(dtypes) -> int:
    """The training step's Triton backwards, at DeiT-S (C = 384) and ViT-L (C = 1024) widths,
    batch 256 and batch 1 (channels split)."""
    count = 0
    variants = list(itertools.product(dtypes, (0, 1, 2, 3), (False, True), (384, 1024), (256,)))
    variants += [("fp16", mode, True, 384, 1) for mode in (0, 1, 2, 3)]
    for dtype, mode, has_size, C, B in variants:
        cfg = dict(merge_backward_config(GPU, B, 197, C, mode))
        warps = cfg.pop("num_warps")
        compile_kernel(GBK._merge_backward_kernel, dict(MODE=mode, HAS_SIZE=has_size, ACC_DTYPE=tl.float32, **cfg),
                       dtype, ("g_ptr", "x_ptr", "out_ptr", "gx_ptr"), warps)
        count += 1
    # the one-step-ahead attention output's backward: the model's path (attention-and-size
    # pooling, log sizes) everywhere, every option once in fp16 at D = 64
    from mctf_kernels.triton import configs  # noqa: E402
    for dtype, D in itertools.product(dtypes, (64, 128)):
        options = [(1, True, True)] + ([o for o in itertools.product((0, 1, 3), (False, True), (False, True))
                                        if o != (1, True, True)] if (dtype, D) == ("fp16", 64) else [])
        cfg = configs.attention_backward_config(D, D, True, dtype == "fp32")
        for mode, has_size, has_log in options:
            for kernel, sub in ((ABK._attention_bwd_dq_kernel, "dq"), (ABK._attention_bwd_dkv_kernel, "dkv")):
                launch = dict(cfg[sub])
                warps, maxnreg = launch.pop("num_warps"), launch.pop("maxnreg")
                compile_kernel(kernel, dict(MODE=mode, HAS_SIZE=has_size, HAS_LOG_SIZE=has_log, QK_PRECISION="ieee",
                                            PV_PRECISION="ieee", ACC_DTYPE=tl.float32, BLOCK_D=cfg["BLOCK_D"],
                                            BLOCK_DK=cfg["BLOCK_DK"], BLOCK_R=cfg["BLOCK_R"], **launch),
                               dtype, ("q_ptr", "k_ptr", "v_ptr", "g_ptr", "dq_ptr", "dk_ptr"), warps, maxnreg=maxnreg)
                count += 1
        launch = dict(cfg["slot_sum"])
        warps = launch.pop("num_warps")
        compile_kernel(ABK._slot_sum_kernel, dict(ACC_DTYPE=tl.float32, BLOCK_D=cfg["BLOCK_D"], **launch),
                       dtype, ("dv_ptr",), warps)
        count += 1
    return count


def main() -> int:
    start, count = time.time(), 0
    dtypes = ("fp32", "fp16", "bf16")
    # score-and-match, at DeiT-S and ViT-H/14 shapes; the preset's temperatures
    # (1, 20, 40) and others reaching every pow path
    pow_modes = [(MK.POW_ONE, MK.POW_GENERAL, MK.POW_GENERAL), (MK.POW_SQRT, MK.POW_OFF, MK.POW_SQUARE),
                 (MK.POW_CUBE, MK.POW_GENERAL, MK.POW_OFF), (MK.POW_OFF, MK.POW_OFF, MK.POW_OFF)]
    tome_modes = (MK.SIM_COSINE, MK.POW_OFF, MK.POW_OFF)
    # (T, C, images): B = 256 at T = 117 takes the many-images branch (8 warps, 32-row blocks)
    for (T, C, B), dtype in itertools.product(((197, 384, 1), (117, 384, 256), (1370, 1280, 1)), dtypes):
        t1, t2 = (T + 1) // 2, T // 2
        half = dtype != "fp32"
        cfg = match_configs(True, t1, t2, C, T, half, B)
        launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], maxnreg=cfg["maxnreg"])
        dot = dict(HALF=half, DOT_DTYPE={"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}[dtype])
        # the preset's pow paths everywhere; the others (and no prefix token) once, in fp16 at DeiT-S
        variants = [(pow_modes[0], True)] + ([(m, p) for m in pow_modes for p in (False, True)][1:]
                                             if (T, dtype) == (197, "fp16") else [])
        # ToMe's raw cosine (no other criterion) everywhere, without a prefix token once
        variants += [(tome_modes, True)] + ([(tome_modes, False)] if (T, dtype) == (197, "fp16") else [])
        if cfg["fused"]:
            for (sim, info, size), prot in variants:
                # the model's call writes the slot index too (WITH_SLOTS); match() alone does not
                for bidir, remap, slots in ((True, False, True), (False, False, True), (True, True, True),
                                            (True, False, False)):
                    compile_kernel(MK._match_fused_kernel, dict(
                        SIM_MODE=sim, INFO_MODE=info, SIZE_MODE=size, HAS_PROT=prot, BIDIR=bidir, REMAP=remap and prot,
                        USE_LIBDEVICE=1 if half else 2, **dot, BLOCK_A=cfg["BLOCK_A"], BLOCK_B=cfg["BLOCK_B"], BLOCK_M=cfg["BLOCK_M"],
                        BLOCK_C=cfg["BLOCK_C"], BLOCK_J=cfg["BLOCK_J"], BLOCK_P=16, WITH_SLOTS=slots),
                        dtype, ("x_ptr",), **launch)
                    count += 1
            continue
        compile_kernel(MK._token_stats_kernel, dict(HAS_INFO=True, HAS_SIZE=True, BLOCK_T=cfg["BLOCK_A"],
                       BLOCK_C=cfg["BLOCK_C"], BLOCK_R=cfg["BLOCK_R"]), dtype, ("x_ptr",), cfg["num_warps"])
        count += 1
        for (sim, info, size), prot in variants:
            common = dict(SIM_MODE=sim, INFO_MODE=info, SIZE_MODE=size, HAS_PROT=prot, USE_LIBDEVICE=1 if half else 2, **dot,
                          BLOCK_A=cfg["BLOCK_A"], BLOCK_B=cfg["BLOCK_B"], BLOCK_C=cfg["BLOCK_C"])
            compile_kernel(MK._row_max_kernel, common, dtype, ("x_ptr",), cfg["num_warps"])
            compile_kernel(MK._col_max_kernel, common, dtype, ("x_ptr",), cfg["num_warps"])
            count += 2
        compile_kernel(MK._rank_kernel, dict(BLOCK=cfg["BLOCK_A"], BLOCK_J=cfg["BLOCK_J"]), num_warps=cfg["num_warps"])
        count += 1
        for bidir, prot, remap in ((True, True, False), (False, False, False), (True, True, True)):
            compile_kernel(MK._assign_kernel, dict(BIDIR=bidir, HAS_PROT=prot, REMAP=remap, BLOCK_T=cfg["BLOCK_A"],
                                                   BLOCK_J=cfg["BLOCK_J"], BLOCK_P=16), num_warps=cfg["num_warps"])
            count += 1
    # merge: token features (C = 384, 1280) at batch 256 and 1 (other slot blocks / channel
    # splits), with and without sources; and the slot index at T = 197, 577
    merge_variants = list(itertools.product(dtypes, (0, 1, 2, 3), (False, True), (False, True), (384, 1280), (256,)))
    merge_variants += [("fp16", mode, True, False, 384, 1) for mode in (0, 1, 2, 3)]  # channels split at batch 1
    for dtype, mode, has_size, has_source, C, B in merge_variants:
        cfg = dict(merge_config(GPU, B, 197, 181, C, 197 if has_source else 0))
        warps = cfg.pop("num_warps")
        compile_kernel(GK._merge_kernel, dict(MODE=mode, HAS_SIZE=has_size, HAS_SOURCE=has_source,
                                              ACC_DTYPE=tl.float32, **cfg),
                       dtype, ("x_ptr", "out_ptr", "src_ptr", "new_src_ptr"), warps)
        count += 1
    # with the LayerNorm of x' (whole rows per program: DeiT-S and ViT-L widths)
    for dtype, mode, C, B in itertools.product(dtypes, (1, 2), (384, 1024), (256, 1)):
        cfg = dict(merge_config(GPU, B, 197, 181, C, 0, whole_rows=True))
        warps = cfg.pop("num_warps")
        compile_kernel(GK._merge_kernel, dict(MODE=mode, HAS_SIZE=True, HAS_SOURCE=False, ACC_DTYPE=tl.float32,
                                              HAS_NORM=True, EVEN_C=cfg["BLOCK_C"] * cfg["NCHUNK"] == C, **cfg),
                       dtype, ("x_ptr", "out_ptr", "norm_w_ptr", "norm_b_ptr", "normed_ptr"), warps)
        count += 1
    # the inference epilogues: the LayerNorm at the token positions; the residual (+ layer scale)
    # with LN2; DeiT-T/S, ViT-B/L widths and a masked one (C = 100)
    for dtype, C, at_tokens, residual in itertools.product(dtypes, (192, 384, 768, 1024, 100), (False, True),
                                                           (False, True)):
        cfg = dict(merge_config(GPU, 256, 197, 181, C, 0, whole_rows=True))
        warps = cfg.pop("num_warps")
        tl_dtype = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}[dtype]
        compile_kernel(GK._merge_kernel, dict(MODE=1, HAS_SIZE=True, HAS_SOURCE=False, ACC_DTYPE=tl.float32,
                                              HAS_NORM=True, NORM_AT_TOKENS=at_tokens, HAS_RESIDUAL=residual,
                                              HAS_SCALE=residual, SCALED_DTYPE=tl_dtype,
                                              EVEN_C=cfg["BLOCK_C"] * cfg["NCHUNK"] == C, **cfg),
                       dtype, ("x_ptr", "out_ptr", "norm_w_ptr", "norm_b_ptr", "normed_ptr", "res_ptr", "scale_ptr"),
                       warps)
        count += 1
    # the row merge of the one-step-ahead output: (B, T, H, D) rows read as one row of H * D channels
    for dtype, mode in itertools.product(dtypes, (0, 1, 3)):
        cfg = dict(merge_config(GPU, 256, 197, 181, 384, 0))
        warps = cfg.pop("num_warps")
        compile_kernel(GK._merge_kernel, dict(MODE=mode, HAS_SIZE=True, HAS_SOURCE=False, ACC_DTYPE=tl.float32,
                                              GROUP_C=64, **cfg),
                       dtype, ("x_ptr", "out_ptr"), warps)
        count += 1
    for T in (197, 577):
        cfg = dict(slot_index_config(GPU, T, T - 16))
        warps = cfg.pop("num_warps")
        compile_kernel(SK._slot_index_kernel, cfg, num_warps=warps)
        count += 1
    # attention: received from P, the flash-style lse/received and V'[dest] gather, and P' @ V' from P
    from mctf_kernels.triton import configs  # noqa: E402
    for dtype, D in itertools.product(dtypes, (48, 64, 128)):
        compile_kernel(AK._attention_received_kernel, dict(BLOCK_Q=32, BLOCK_K=64), dtype, ("attn_ptr",))
        precisions = ("ieee", "tf32") if dtype == "fp32" else ("ieee",)
        # bias: none, log sizes given (training), sizes given (the kernel's libdevice log and the mask)
        for T, precision, bias in itertools.product((197, 577), precisions, ("none", "log", "size")):
            # a small batch (per-query-block partials) and one that fills the GPU (one program per image)
            for batch in (1, 256):
                cfg = configs.attention_received_qk_config(T, D, True, dtype == "fp32", batch=batch)
                if batch > 1 and not cfg["PER_IMAGE"]:
                    continue
                consts = dict(HAS_LOG_SIZE=bias != "none", SIZE_GIVEN=bias == "size", WRITE_MASK=bias == "size",
                              USE_LIBDEVICE=True, QK_PRECISION=precision, BLOCK_M=cfg["BLOCK_M"],
                              BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], ONE_TILE=cfg["ONE_TILE"],
                              PER_IMAGE=cfg["PER_IMAGE"])
                compile_kernel(FK._attention_lse_received_kernel, consts, dtype, ("q_ptr", "k_ptr", "mask_ptr"),
                               cfg["num_warps"], num_stages=cfg["num_stages"], maxnreg=cfg["maxnreg"])
                count += 1
        for has_log in (False, True):  # V'[dest] and the log-size mask of the output's attention
            cfg = dict(configs.gather_values_config(197, D, True))
            warps = cfg.pop("num_warps")
            compile_kernel(FK._gather_values_kernel, dict(HAS_LOG_SIZE=has_log, **cfg), dtype,
                           ("v_ptr", "out_ptr", "bias_ptr"), warps)
            count += 1
        # P' @ V' from P (training with attention dropout): attention-and-size pooling everywhere,
        # every option once in fp16 at D = 64
        options = [(1, True)] + ([o for o in itertools.product((0, 1, 3), (False, True)) if o != (1, True)]
                                 if (dtype, D) == ("fp16", 64) else [])
        for mode, has_size in options:
            cfg = configs.attention_output_config(D, True, dtype == "fp32")
            consts = dict(MODE=mode, HAS_SIZE=has_size, PV_PRECISION="ieee", ACC_DTYPE=tl.float32,
                          **{n: cfg[n] for n in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_T")})
            compile_kernel(AK._fused_attention_output_kernel, consts, dtype, ("attn_ptr", "v_ptr", "out_ptr"),
                           cfg["num_warps"], maxnreg=cfg["maxnreg"])
            count += 1
        count += 1
    count += compile_backward_kernels(dtypes)
    print(f"compiled {count} kernel variants for sm_90 in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    from mctf_kernels.triton.configs import force_gpu_configs

    with force_gpu_configs():
        sys.exit(main())
