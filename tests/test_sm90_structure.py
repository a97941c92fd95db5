"""Structural checks of the GPU path, from the static sm_90 report (bench/sm90.py).

Each path (model, dtype) runs one forward on fake CUDA tensors through the real
launchers, so every Triton launch is the one a GPU would make; each distinct launch is
compiled for sm_90 with the JIT's specialisation. The checks read compiler facts and
kernel counts only, never timings (those are estimates, in bench/sm90_report.py).

The expectations are the GPU-path targets (all met since v4); a target a redesign misses
is marked ``xfail(strict=True)`` with its numbers, so that meeting it again XPASSes and
fails until the mark is removed.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# DeiT-S at the batch the targets are set for (fake tensors: no data, so a big batch is free;
# at a batch that fills the GPU the attention writes `received` without a separate sum).
PATHS = {
    "deit_s-fp16": ("deit_small_patch16_224", 256, "fp16", None),
    "deit_s-autocast": ("deit_small_patch16_224", 256, "autocast", None),
    "vit_l16_384-fp16": ("vit_large_patch16_384", 2, "fp16", {"img_size": 384}),
    # ToMe (r = 16 in every block): its raw-cosine matcher down to T = 21 (16 x 16 tiles)
    "deit_s-tome16-fp16": ("deit_small_patch16_224", 256, "fp16", None, "tome-r16"),
}
MAX_KERNELS_PER_FUSED_LAYER = 14  # Triton launches + kernel-launching torch ops (a plain timm block: 10, 12 autocast)
# What the kernels reach today, a regression ceiling below the target: v3 traded kernels for
# time (P' @ V' as gather + torch's fused attention + row merge) and reached 18 / 20; v4's rows
# flow (the attention kernel takes log(size) and writes the mask, the matcher writes the slot
# index, the merge writes LN1(x') at the token positions so the value projection gives
# V'[dest], and the row merge after proj adds the residual and applies norm2) 13 / 14.
KERNELS_PER_FUSED_LAYER_NOW = {"deit_s-fp16": 13, "deit_s-autocast": 14}


# (path, check, marks): the checks are the functions named check_<check> below.
EXPECTATIONS = [
    ("deit_s-fp16", "captured", ()),
    ("deit_s-autocast", "captured", ()),
    ("vit_l16_384-fp16", "captured", ()),
    ("deit_s-fp16", "no_host_sync", ()),
    ("deit_s-fp16", "no_spills", ()),
    ("deit_s-autocast", "no_spills", ()),
    ("vit_l16_384-fp16", "no_spills", ()),
    ("deit_s-tome16-fp16", "captured", ()),
    ("deit_s-tome16-fp16", "no_spills", ()),
    ("deit_s-tome16-fp16", "mma_in_match", ()),
    ("deit_s-fp16", "kernels_per_fused_layer", ()),
    ("deit_s-autocast", "kernels_per_fused_layer", ()),
    ("deit_s-fp16", "kernels_per_fused_layer_now", ()),
    ("deit_s-autocast", "kernels_per_fused_layer_now", ()),
    ("deit_s-fp16", "mma_in_dot_kernels", ()),
    ("deit_s-autocast", "mma_in_dot_kernels", ()),
    ("vit_l16_384-fp16", "mma_in_dot_kernels", ()),
    ("deit_s-fp16", "mma_in_match", ()),
    ("deit_s-autocast", "mma_in_match", ()),
    ("deit_s-fp16", "mma_in_attention", ()),
    ("deit_s-autocast", "mma_in_attention", ()),
]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """One subprocess (no TRITON_INTERPRET: the kernels are compiled, not interpreted)
    builds every path's structure; Triton's own cache keeps reruns fast."""
    out = tmp_path_factory.mktemp("sm90") / "structure.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    specs = json.dumps([list(p) for p in PATHS.values()])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "sm90.py"), str(out), specs],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    if proc.returncode == 3:
        pytest.skip("this Triton install has no CUDA compiler backend (ptxas/cuobjdump)")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    data = json.loads(out.read_text())
    return {name: data["|".join(map(str, spec))] for name, spec in PATHS.items()}


def check_captured(r):
    """The report saw what it claims: Triton launches in every fused layer, each compiled."""
    fused = [b for b in r["blocks"] if b["fused"]]
    assert len(fused) >= 10, [b["block"] for b in r["blocks"]]
    assert all(b["triton"] >= 1 for b in fused)
    assert r["launches"] and all(e["registers"] > 0 and e["sass_instructions_static"] > 0 for e in r["launches"])
    assert all(e["grid"][0] >= 1 for e in r["launches"])


def check_no_host_sync(r):
    assert r["summary"]["host_syncs"] == 0


def check_no_spills(r):
    spills = {e["name"].split(":")[-1]: e["spill_bytes"] for e in r["launches"] if e["spill_bytes"]}
    assert not spills, f"register spills (bytes): {spills}"


def _check_kernels_per_fused_layer(r, limit):
    worst = max((b for b in r["blocks"] if b["fused"]), key=lambda b: b["kernels"])
    assert worst["kernels"] <= limit, (
        f"block {worst['block']}: {worst['triton']} Triton + {worst['torch']} torch kernels; "
        f"torch ops {worst['torch_ops']}")


def check_kernels_per_fused_layer(r):
    _check_kernels_per_fused_layer(r, MAX_KERNELS_PER_FUSED_LAYER)


def check_kernels_per_fused_layer_now(r):
    _check_kernels_per_fused_layer(r, KERNELS_PER_FUSED_LAYER_NOW[r["path"]])


def check_mma_in_dot_kernels(r):
    """Every kernel with a dot compiles it to tensor-core MMA (HMMA/HGMMA) on the half path."""
    without = sorted({e["name"].split(":")[-1] for e in r["launches"] if e["has_dot"] and not e["mma"]})
    assert not without, f"dots without tensor-core MMA: {without}"


def _mma_in(r, word):
    mine = [e for e in r["launches"] if word in (e["in_mctf_op"] or "") or word in e["name"].split(":")[0]]
    assert mine, f"no Triton launch belongs to a '{word}' op or kernel module"
    assert any(e["mma"] for e in mine), sorted({e["name"] for e in mine})


def check_mma_in_match(r):
    _mma_in(r, "match")


def check_mma_in_attention(r):
    _mma_in(r, "attention")


@pytest.mark.parametrize(
    "path,check",
    [pytest.param(p, c, marks=m, id=f"{p}-{c}") for p, c, m in EXPECTATIONS],
)
def test_sm90_structure(reports, path, check):
    globals()[f"check_{check}"](dict(reports[path], path=path))


# ---- the report's own arithmetic (pure functions, no compiler needed)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import sm90  # noqa: E402


@pytest.mark.parametrize("regs,warps,smem,ctas", [
    (255, 4, 32768, 2),     # 8192 registers a warp: 2 warps per scheduler
    (168, 4, 1024, 3),      # 5376 a warp: 3 per scheduler, 12 warps
    (74, 4, 32768, 6),      # 2560 a warp: 6 per scheduler (not 25 // 4 over the whole file)
    (32, 2, 0, 32),         # the 32-CTA limit
    (40, 8, 100 * 1024, 2),  # shared memory: 2 x (100 KiB + 1 KiB reserved) <= 228 KiB
])
def test_occupancy_arithmetic(regs, warps, smem, ctas):
    occ = sm90.occupancy(regs, warps, smem)
    assert occ["ctas_per_sm"] == ctas
    assert occ["occupancy"] == ctas * warps / 64


def test_ttir_reads_writes_and_loop_weights():
    func = ('  tt.func public @k(%x_ptr: !tt.ptr<f16> loc("x_ptr"(#loc)), %o_ptr: !tt.ptr<f32> loc("o_ptr"(#loc)), '
            '%C: i32 loc("C"(#loc))) {')
    ttir = "module {\n" + func + """
    %c0_i32 = arith.constant 0 : i32 loc(#loc1)
    %c32_i32 = arith.constant 32 : i32 loc(#loc1)
    %a = tt.splat %x_ptr : !tt.ptr<f16> -> tensor<32x!tt.ptr<f16>> loc(#loc2)
    %s = scf.for %i = %c0_i32 to %C step %c32_i32 iter_args(%acc = %c0_i32) -> (i32)  : i32 {
      %p = tt.addptr %a, %i : tensor<32x!tt.ptr<f16>>, i32 loc(#loc3)
      %v = tt.load %p : tensor<32x!tt.ptr<f16>> loc(#loc4)
      scf.yield %acc : i32 loc(#loc5)
    } loc(#loc6)
    %q = tt.splat %o_ptr : !tt.ptr<f32> -> tensor<32x!tt.ptr<f32>> loc(#loc7)
    tt.store %q, %cst : tensor<32x!tt.ptr<f32>> loc(#loc8)
    tt.return loc(#loc9)
  } loc(#loc)
} loc(#loc)
"""
    info = sm90.analyse_ttir(ttir, {"C": 384})
    assert info["read_args"] == ["x_ptr"] and info["write_args"] == ["o_ptr"]
    assert info["unknown_trip_loops"] == 0
    # outside the loop only the store works (constants and splats are layout-only; the for itself is
    # not counted); the 2 ops inside run 384 / 32 times; 32 elements over 4 warps: 1 a thread each
    assert info["dyn_over_static"] == pytest.approx((1 + 2 * 12) / 3)


def test_ttir_op_work_counts_elements_per_thread():
    """An op costs its largest tensor's elements per thread: a loop over 64 x 256 tiles is not
    diluted by straight-line ops on one value per token (e.g. a sort)."""
    big = "%s = arith.addf %a, %b : tensor<64x256xf32> loc(#loc1)"
    small = "%t = arith.addi %c, %d : tensor<256xi32> loc(#loc1)"
    assert sm90._op_work("arith.addf", big, 512) == 32
    assert sm90._op_work("arith.addi", small, 512) == 1
    assert sm90._op_work("arith.addi", "%i = arith.addi %j, %k : i32", 512) == 1
    assert sm90._op_work("tt.broadcast", big, 512) == 0
