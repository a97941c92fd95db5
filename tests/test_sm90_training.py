"""Structural checks of a training step's GPU path, from the static sm_90 report
(bench/sm90.py, ``train=True``): one forward + backward of DeiT-S on fake CUDA tensors
through the real launchers, every Triton launch compiled for sm_90. Compiler facts and
kernel counts only, never timings.

The MCTF backward is Triton: the merge's gather and the flash-style attention backward.
No MCTF backward op forms an attention-sized (B, H, T, T) tensor, nothing spills, nothing
synchronises with the host.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys
sys.path.insert(0, "bench")
import sm90
r = sm90.report("deit_small_patch16_224", 8, "autocast", "mctf", None, latency_batch=None, plain=False, train=True)
t = r["summary"]["training"]
bwd = [e for e in r["launches"] if e["phase"] == "backward"]
json.dump(dict(training=t, host_syncs=r["summary"]["host_syncs"], depth=len(r["tokens_per_block"]),
               spills={e["name"]: e["spill_bytes"] for e in r["launches"]},
               backward_mma={e["name"].split(":")[-1]: e["mma"] for e in bwd},
               backward_blocks=sorted({e["block"] for e in bwd if e["block"] is not None})), open(sys.argv[1], "w"))
"""


@pytest.fixture(scope="module")
def step(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90train") / "train.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=1200)
    if "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("this Triton install has no CUDA compiler toolchain")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


@pytest.mark.slow
def test_mctf_backward_is_triton(step):
    t = step["training"]
    fused_layers = step["depth"] - 1  # the preset fuses blocks 1..depth-1
    assert t["backward_mctf_triton"] == {
        "_merge_backward_kernel": fused_layers,
        "_attention_bwd_dq_kernel": fused_layers,
        "_attention_bwd_dkv_kernel": fused_layers,
        "_slot_sum_kernel": fused_layers,
    }
    assert t["backward_mctf_torch_ops"] == {}, t["backward_mctf_torch_ops"]  # the eager backward ran ~70 per layer
    assert t["backward_mctf_kernels_per_fused_layer_max"] == 4
    assert t["backward_mctf_square_bytes"] == 0  # no (B, H, T, T) tensor in the MCTF backward
    assert step["backward_blocks"] == list(range(1, step["depth"]))  # launches attributed to their blocks


@pytest.mark.slow
def test_training_step_compiles_clean(step):
    assert step["host_syncs"] == 0
    assert all(v == 0 for v in step["spills"].values()), {k: v for k, v in step["spills"].items() if v}
    # the attention backward's dots run on tensor cores on the half path (autocast: fp16 q, k, v)
    for name in ("_attention_bwd_dq_kernel", "_attention_bwd_dkv_kernel"):
        assert step["backward_mma"][name], name
