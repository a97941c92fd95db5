"""Static sm_90 (H100) report of one MCTF forward, without a GPU.

    python3 bench/sm90_report.py --model deit_small_patch16_224 --batch 256 --dtype fp16 \
        [--preset mctf] [--out bench/results/] [--name before] [--img-size 384] [--latency-batch 1]

Writes ``sm90[-<name>]-<model short>-<dtype>-b<batch>.json`` and ``.md``: per Triton kernel
(grid, waves, warps, registers, spills, shared memory, occupancy, SASS instructions, tensor-core
MMA, bytes), GPU kernels per fused layer and per forward against the plain timm model, and
roofline/issue time estimates on an H100 (constants in ``bench/sm90.py``, ``H100``). Every time
and speedup is an estimate, labelled so; nothing runs on a GPU. See bench/NOTES.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # kernels are compiled for sm_90, not interpreted
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sm90  # noqa: E402


def _f(x, nd=1):
    return "-" if x is None else f"{x:,.{nd}f}"


def markdown(r: dict) -> str:
    s = r["summary"]
    lb = r["latency_batch"]
    method = "ToMe" if str(r["preset"]).startswith("tome") else "MCTF"  # whose kernels the patched rows run
    out = [
        f"# Static sm_90 report: {r['model']}, {r['dtype']}, batch {r['batch']}, preset {r['preset']}",
        "",
        f"Device: **{r['device']}** ({r['date']}; torch {r['versions']['torch']}, triton "
        f"{r['versions']['triton']}, timm {r['versions']['timm']}). Compiler facts are exact for the launches "
        "a GPU would make; every time, share and speedup (`est_`) is an **estimate** from the constants at the end, "
        "not a measurement.",
        "",
        f"Tokens after each block: {r['tokens_per_block']}",
        "",
        "## Per forward",
        "",
        f"| figure | {method} (triton) | plain timm (SDPA) |",
        "| --- | ---: | ---: |",
        f"| GPU kernels per forward | {s['kernels_per_forward']} | {s['kernels_per_forward_plain']} |",
        f"| GPU kernels per fused layer (max / min) | {s['kernels_per_fused_layer_max']} / "
        f"{s['kernels_per_fused_layer_min']} | {s['kernels_per_plain_block']} per block |",
        f"| of which Triton launches (max per fused layer) | {s['triton_kernels_per_fused_layer_max']} | 0 |",
        f"| dense GFLOP (GEMM + SDPA, 2 per MAC) | {s['dense_flops_patched'] / 1e9:,.0f} | "
        f"{s['dense_flops_plain'] / 1e9:,.0f} |",
        f"| est. forward time, eager (us) | {_f(s['est_patched_eager_us'])} | {_f(s['est_plain_eager_us'])} |",
        f"| est. forward time, CUDA graph (us) | {_f(s['est_patched_cuda_graph_us'])} | "
        f"{_f(s['est_plain_cuda_graph_us'])} |",
    ]
    if lb:
        out.append(f"| est. batch-{lb} latency, CUDA graph (us) | {_f(s[f'est_patched_b{lb}_cuda_graph_us'])} | "
                   f"{_f(s[f'est_plain_b{lb}_cuda_graph_us'])} |")
    out += [
        "",
        f"- est. speedup over plain timm, batch {r['batch']}: **{s['est_speedup_eager']:.2f}x** eager, "
        f"{s['est_speedup_cuda_graph']:.2f}x CUDA graph (FLOP ideal {s['flop_ideal_speedup']:.2f}x)"
        + (f"; batch {lb} with CUDA graphs: **{s[f'est_speedup_b{lb}_cuda_graph']:.2f}x**" if lb else ""),
        f"- est. {method} kernel time in the fused layers: {_f(s['est_mctf_us_fused_layers'])} us against "
        f"{_f(s['est_dense_us_fused_layers'])} us of their dense work (GEMM + attention): est. share "
        f"**{s['est_mctf_share_of_fused_layer_dense']:.0%}**",
        f"- register spills: {s['max_spill_bytes']} bytes at most ({', '.join(s['kernels_with_spills']) or 'none'}); "
        f"Triton kernels without tensor-core MMA: {', '.join(s['kernels_without_mma']) or 'none'}; "
        f"host syncs in the forward: {s['host_syncs']}",
        "",
        "## Issue 8 targets",
        "",
        "| target | this report | met |",
        "| --- | --- | --- |",
    ]
    dot_ok = not s["dot_kernels_without_mma"]
    rows = [
        ("GPU kernels per fused layer <= 14", s["kernels_per_fused_layer_max"],
         s["kernels_per_fused_layer_max"] <= 14),
        ("no register spills", f"{s['max_spill_bytes']} B", s["max_spill_bytes"] == 0),
        ("tensor-core MMA in every kernel with a dot (half path)",
         ", ".join(s["dot_kernels_without_mma"]) or "all", dot_ok if r["dtype"] != "fp32" else None),
        ("occupancy >= 25% for kernels > 5% of the est. layer time",
         ", ".join(s["est_hot_kernels_below_25pct_occupancy"]) or "all",
         not s["est_hot_kernels_below_25pct_occupancy"]),
        ("est. MCTF kernel time <= 15% of the fused layers' dense work",
         f"{s['est_mctf_share_of_fused_layer_dense']:.0%}", s["est_mctf_share_of_fused_layer_dense"] <= 0.15),
        (f"est. speedup >= 1.45x at batch {r['batch']} (eager)", f"{s['est_speedup_eager']:.2f}x",
         s["est_speedup_eager"] >= 1.45),
    ]
    if lb:
        rows.append((f"est. speedup >= 1.0x at batch {lb}, CUDA graphs", f"{s[f'est_speedup_b{lb}_cuda_graph']:.2f}x",
                     s[f"est_speedup_b{lb}_cuda_graph"] >= 1.0))
    out += [f"| {t} | {v} | {'-' if ok is None else 'yes' if ok else '**no**'} |" for t, v, ok in rows]
    out += [
        "",
        "Targets marked est. are read from estimates; the 1.45x and 15% targets were set for DeiT-S at batch 256.",
        "",
        "## Triton kernels (launch in the first fused layer; totals over the forward)",
        "",
        "| kernel | launches | specs | grid | waves | warps | regs | spill B | smem KiB | CTAs/SM | occupancy "
        "| SASS static | est. SASS/program | MMA | est. MB | est. us (issue / memory) | est. us total |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: "
        "| ---: | ---: |",
    ]
    for k in r["kernels"]:
        f = k["first_fused_layer"]
        out.append(
            f"| `{k['kernel']}` | {k['launches']} | {k['specialisations']} | {tuple(f['grid'])} | {f['waves']:.2f} "
            f"| {f['num_warps']} | {f['registers']} | {f['spill_bytes']} | {f['shared_bytes'] / 1024:.1f} "
            f"| {f['ctas_per_sm']} ({f['limited_by']}) | {f['occupancy']:.1%} | {f['sass_instructions_static']:,} "
            f"| {f['est_sass_per_program']:,.0f}{'*' if f['unknown_trip_loops'] else ''} "
            f"| {', '.join(f['mma']) or 'none'} ({f['mma_instructions_static']}) | {f['est_bytes'] / 1e6:.1f} "
            f"| {f['est_issue_us']:.1f} / {f['est_memory_us']:.1f} | {k['est_total_us']:.0f} |")
    out += [
        "",
        "`*`: a loop whose trip count depends on data counts once (the estimate is a lower bound). "
        "SASS static = instructions in the cubin; est. SASS/program weights loop bodies by their trip counts and each op by its elements per thread.",
        "",
        "## Per block (GPU kernels and estimated time, us)",
        "",
        "| block | tokens in | kernels | Triton | torch | est. dense | est. MCTF | est. other torch | torch ops |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    toks = r["tokens_per_block"] or []
    # block 0's input: its matcher's T when it merges (ToMe merges in every block), else its output count
    first_t = next((e["args"]["T"]["value"] for e in r.get("launches", [])
                    if e.get("block") == 0 and "match" in e["name"] and "T" in e.get("args", {})), None)
    for b in r["blocks"]:
        i = b["block"]
        tin = (toks[i - 1] if isinstance(i, int) and i > 0 and toks else
               (first_t or toks[0]) if i == 0 and toks else "")
        ops = ", ".join(f"{k.replace('aten::', '')} {v}" for k, v in sorted(b["torch_ops"].items()))
        out.append(f"| {i} | {tin} | {b['kernels']} | {b['triton']} | {b['torch']} | {_f(b['est_dense_us'])} "
                   f"| {_f(b['est_mctf_us'])} | {_f(b['est_other_us'])} | {ops} |")
    pb = next((b for b in r["plain_blocks"] if b["block"] == 1), None)
    if pb:
        ops = ", ".join(f"{k.replace('aten::', '')} {v}" for k, v in sorted(pb["torch_ops"].items()))
        out += ["", f"Plain timm block (block 1): {pb['kernels']} kernels ({ops}), est. "
                    f"{_f(pb['est_dense_us'])} us dense + {_f(pb['est_other_us'])} us other."]
    out += ["", "## Constants of the estimate (bench/sm90.py, `H100`)", "", "| constant | value |",
            "| --- | ---: |"]
    out += [f"| {k} | {v:,} |" if isinstance(v, (int, float)) else f"| {k} | {v} |" for k, v in r["constants"].items()]
    out += ["", "Kernel time (est.) = max(issue, memory, kernel_min_us); issue = ceil(programs / SMs) x warps x "
                "est. SASS per program / (4 x clock x min(1, resident warps / warps_for_full_issue)); "
                "memory = bytes of "
                "the pointer arguments the kernel loads or stores (from its TTIR) / (HBM x efficiency). Torch ops: "
                "GEMM/SDPA FLOPs at the tensor-core (fp32: FMA) peak x gemm_efficiency, others their input + output "
                "bytes. Forward (est.): eager = max(sum of kernels + gaps, ops x host cost); CUDA graph = sum of "
                "kernels + node gaps.", ""]
    return "\n".join(out)


def training_markdown(r: dict) -> str:
    """The training step's section (``--train``): every time and share is an estimate."""
    t = r["summary"]["training"]
    ops = ", ".join(f"{k.replace('aten::', '')} {v}" for k, v in sorted(t["backward_mctf_torch_ops"].items()))
    tri = ", ".join(f"{k} {v}" for k, v in sorted(t["backward_mctf_triton"].items()))
    out = [
        "## Training step (forward + backward)",
        "",
        "One step: train mode, forward, then the backward of the mean of the logits (run node by node on the "
        "fake tensors: the autograd engine needs a CUDA driver). MCTF work in the backward = Triton launches and "
        "torch ops inside the `mctf::` ops' backwards. Times and shares are **estimates**.",
        "",
        "| figure | MCTF (triton) | plain timm (SDPA) |",
        "| --- | ---: | ---: |",
        f"| GPU kernels per step | {t['kernels_per_step']} | {t['kernels_per_step_plain']} |",
        f"| of which backward | {t['backward_kernels']} | {t['backward_kernels_plain']} |",
        f"| backward kernels per fused layer (max) / per plain block | {t['backward_kernels_per_fused_layer_max']} "
        f"| {t['backward_kernels_per_plain_block']} |",
        f"| MCTF backward kernels per step (max per fused layer) | {t['backward_mctf_kernels']} "
        f"({t['backward_mctf_kernels_per_fused_layer_max']}) | 0 |",
        f"| est. backward GPU time (us) | {_f(t['est_backward_us'])} | {_f(t['est_backward_plain_us'])} |",
        f"| est. step time, eager (us) | {_f(t['est_step_eager_us'])} | {_f(t['est_step_plain_eager_us'])} |",
        f"| est. step time, CUDA graph (us) | {_f(t['est_step_cuda_graph_us'])} | "
        f"{_f(t['est_step_plain_cuda_graph_us'])} |",
        "",
        f"- est. MCTF backward time: {_f(t['est_backward_mctf_us'])} us = **{t['est_backward_mctf_share_of_step']:.0%}** "
        f"of the step's GPU time ({t['est_backward_mctf_share_of_backward']:.0%} of the backward; the backward's "
        f"dense work: {_f(t['est_backward_dense_us'])} us)",
        f"- attention-sized (..., T, T) operands moved by MCTF backward torch ops: "
        f"**{t['backward_mctf_square_bytes'] / 1e9:,.2f} GB** per step (an estimate of traffic: each op's inputs + "
        "outputs counted once)",
        f"- est. step speedup over plain timm: {t['est_step_speedup_eager']:.2f}x eager, "
        f"{t['est_step_speedup_cuda_graph']:.2f}x CUDA graph" if t["est_step_speedup_eager"] else "",
        f"- MCTF backward Triton launches: {tri or 'none'}",
        f"- MCTF backward torch ops: {ops or 'none'}",
        "",
    ]
    return "\n".join(out)


def _short_model(name: str) -> str:
    return name.replace("_patch16_224", "").replace("_patch16_384", "16_384")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", choices=("fp16", "bf16", "autocast", "fp32"), default="fp16")
    p.add_argument("--preset", default="mctf", help="mctf, mctf-fast, or tome-r<N> (Token Merging, r=N per block)")
    p.add_argument("--img-size", type=int, default=None, help="timm img_size (e.g. 384)")
    p.add_argument("--latency-batch", type=int, default=1,
                   help="batch of the CUDA-graph latency estimate (0: none)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--name", default="", help="tag in the file name, e.g. 'before'")
    p.add_argument("--train", action="store_true",
                   help="one training step (forward + backward) instead of a forward: sm90-train-...")
    a = p.parse_args(argv)
    kwargs = {"img_size": a.img_size} if a.img_size else None
    r = sm90.report(a.model, a.batch, a.dtype, a.preset, kwargs, a.latency_batch or None, train=a.train)
    os.makedirs(a.out, exist_ok=True)
    stem = "-".join(x for x in ("sm90", "train" if a.train else "", a.name, _short_model(a.model), a.dtype,
                                f"b{a.batch}") if x)
    with open(os.path.join(a.out, stem + ".json"), "w") as f:
        json.dump(r, f, separators=(",", ":"), default=str)  # compact: ~1 MB otherwise for 24 layers
    md = markdown(r)
    if a.train:  # the step's section first; the forward tables below then count the whole step
        head, _, rest = md.partition("## Per forward")
        md = head + training_markdown(r) + "\n## Per forward (here: the whole step)" + rest
    with open(os.path.join(a.out, stem + ".md"), "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {os.path.join(a.out, stem)}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
