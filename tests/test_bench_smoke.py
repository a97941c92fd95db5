"""The benchmarks run and report consistent numbers (CPU, tiny models).

Performance itself is measured by the benchmarks, never asserted here: only the
output's fields and the arithmetic between them are checked.
"""
import ast
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import statistics

from mctf.cli import bench as bench_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--models", "deit_tiny_patch16_224", "--model-kwargs", '{"img_size": 64, "depth": 2}',
        "--batch-size", "2", "--seconds", "0", "--warmup", "0", "--warmup-seconds", "0", "--repeats", "2",
        "--max-iters", "1", "--threads", "1", "--device", "cpu"]


def _close(a, b):
    return math.isclose(a, b, rel_tol=1e-9)


def _run(tmp_path, *extra):
    path = tmp_path / "out.json"
    assert bench_cli.main(TINY + list(extra) + ["--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_cli_rows_and_ratios(tmp_path):
    out = _run(tmp_path, "--dtype", "fp32", "bf16", "--r-sweep", "0", "4", "--latency", "--cuda-graphs")
    meta = out["meta"]
    for key in ("device_name", "torch", "triton", "timm", "date", "argv"):
        assert meta[key], key
    assert meta["device_type"] == "cpu" and meta["device_name"].startswith("CPU")
    assert meta["timing"]["repeats"] == 2 and "data loading" in meta["method"]

    rows = out["rows"]
    # 2 dtypes x (baseline:timm + 2 presets x {eager, triton}) x {plain, cudagraphs}
    assert len(rows) == 2 * (1 + 2 * 2) * 2
    measured = [r for r in rows if r.get("images_per_s")]
    assert {(r["preset"], r["provider"]) for r in measured} == {
        ("baseline", "timm"), ("mctf", "eager"), ("mctf-fast", "eager")}
    assert not [r for r in rows if r.get("error")]
    for r in rows:
        if r["provider"].startswith("triton"):
            assert "CUDA" in r["skipped"]  # one-line reason, the interpreter is never benchmarked
        if r["provider"].endswith("+cudagraphs"):
            assert r.get("skipped")
    skipped = {s["provider"] for s in out["skipped"]}
    assert {"triton", "triton+cudagraphs", "timm+cudagraphs", "eager+cudagraphs"} <= skipped

    for dtype in ("fp32", "bf16"):
        base = next(r for r in rows if r["dtype"] == dtype and r["provider"] == "timm")
        assert base["amp"] is False and base["peak_mem_mb"] is None  # no allocator peak on CPU
        for r in (r for r in measured if r["dtype"] == dtype):
            # timed side by side: the speedup is the median of the per-repeat ratios
            assert r["interleaved"] and len(r["seconds_per_iter"]) == r["repeats"] == 2
            rounds = sorted(b / a for a, b in zip(r["seconds_per_iter"], base["seconds_per_iter"]))
            assert _close(r["speedup"], statistics.median(rounds))
            assert r["speedup_min"] == rounds[0] and r["speedup_max"] == rounds[-1]
            assert r["ips_min"] <= r["images_per_s"] <= r["ips_max"]
            assert _close(r["spread"], (r["ips_max"] - r["ips_min"]) / r["images_per_s"])
            assert r["noisy"] and "no warmup" in r["noisy_reasons"]  # --warmup 0: never presented as a result
            assert _close(r["ideal_speedup"], base["gflops"] / r["gflops"])
            assert _close(r["flop_ratio"], r["ideal_speedup"])
            assert _close(r["achieved_over_ideal"], r["speedup"] / r["ideal_speedup"])
            if r["preset"] != "baseline":
                assert r["gflops"] < base["gflops"] and r["final_tokens"] < base["final_tokens"]
                assert _close(r["vs_eager"], 1.0)  # the eager row is its own reference
    assert "process_peak_rss_mb" in meta and "memory_note" in meta

    sweep = out["r_sweep"]
    assert sweep["model"] == "deit_tiny_patch16_224"  # the given model, not a fixed one
    assert sweep["baseline"]["images_per_s"] and [p["r"] for p in sweep["points"] if p.get("images_per_s")] == [0, 4]
    by_r = {p["r"]: p for p in sweep["points"] if p["provider"] == "eager"}
    assert _close(by_r[0]["gflops"], sweep["baseline"]["gflops"])  # r = 0 fuses nothing
    assert by_r[4]["gflops"] < by_r[0]["gflops"] and by_r[4]["final_tokens"] == 17 - 4
    assert _close(by_r[4]["ideal_speedup"], sweep["baseline"]["gflops"] / by_r[4]["gflops"])
    assert out["latency"]["rows"] == [] and "CUDA" in out["latency"]["skipped"]


@pytest.mark.slow
def test_cli_compile_backend_shorthand_and_save(tmp_path):
    # --backend: the baseline and one MCTF backend
    path = tmp_path / "legacy.json"
    bench_cli.main(TINY + ["--backend", "reference", "--presets", "baseline", "mctf", "--json", str(path)])
    assert [r["provider"] for r in json.loads(path.read_text())["rows"]] == ["timm", "eager"]

    # compile rows (dynamo tracing with a codegen-free backend keeps this fast) and --save's default name
    bench_cli.main(TINY + ["--providers", "eager", "--presets", "mctf", "--compile", "--compile-backend", "aot_eager",
                           "--save", "--results-dir", str(tmp_path / "results")])
    (saved,) = (tmp_path / "results").iterdir()
    assert saved.name.startswith("cpu-") and saved.name.endswith(".json")
    rows = json.loads(saved.read_text())["rows"]
    assert [r["provider"] for r in rows] == ["eager", "eager+compile"]
    assert all(r["images_per_s"] for r in rows) and rows[1]["setup_s"] is not None
    assert rows[0]["speedup"] is None  # no baseline row asked for


def test_mctf_never_imports_triton():
    for path in (ROOT / "mctf").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] == "triton"], path


@pytest.mark.slow
def test_kernel_bench_suite_cpu_smoke(tmp_path):
    """``pytest bench/ --cpu-smoke``: every op x provider once, with its extra_info."""
    report = tmp_path / "kernels.json"
    # no TRITON_INTERPRET here: bench/conftest must switch the interpreter on itself
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MCTF_BENCH_COMPILE_BACKEND"] = "aot_eager"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/", "--cpu-smoke", "-q", "-p", "no:cacheprovider",
         f"--benchmark-json={report}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["machine_info"]["mctf"]["smoke"] is True
    seen = set()
    for b in data["benchmarks"]:
        info = b["extra_info"]
        seen.add((info["op"], info["provider"]))
        for key in ("median_ms", "bytes_moved", "bytes_formula", "gbps", "copy_gbps", "pct_of_copy_bw"):
            assert key in info, key
        assert _close(info["gbps"], info["bytes_moved"] / (info["median_ms"] / 1e3) / 1e9)
        assert _close(info["pct_of_copy_bw"], 100 * info["gbps"] / info["copy_gbps"])
    ops = ("match", "merge", "attention_received", "fused_attention_output", "fusion_attention",
           "fused_attention_output_qk")
    assert seen == {(o, p) for o in ops for p in ("reference", "compiled", "triton")}


def test_readme_table(tmp_path):
    out = _run(tmp_path, "--dtype", "fp32", "--presets", "baseline", "mctf")
    table = subprocess.run([sys.executable, str(ROOT / "bench" / "readme_table.py"), str(tmp_path / "out.json"), "--all"],
                           check=True, capture_output=True, text=True, timeout=60).stdout
    body = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(body) == 1 + len(out["rows"])  # header + every row (skipped ones with their reason)
    assert "skipped: Triton kernels need CUDA" in table and out["meta"]["device_name"] in table
    assert "(noisy: " in table  # --warmup 0 rows are noisy, and say why
    # without --all a noisy row is not presented as a result
    plain = subprocess.run([sys.executable, str(ROOT / "bench" / "readme_table.py"), str(tmp_path / "out.json")],
                           check=True, capture_output=True, text=True, timeout=60).stdout
    assert [line for line in plain.splitlines() if line.startswith("| ") and "---" not in line][1:] == []


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is optional (extras 'bench')")
def test_plot_r_sweep(tmp_path):
    _run(tmp_path, "--dtype", "fp32", "--presets", "baseline", "--r-sweep", "0", "4")
    png = tmp_path / "plot.png"
    subprocess.run([sys.executable, str(ROOT / "bench" / "plot.py"), str(tmp_path / "out.json"), "-o", str(png)],
                   check=True, capture_output=True, timeout=120)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fails(args, capsys, message, monkeypatch=None):
    with pytest.raises(SystemExit) as exit_info:
        bench_cli.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "mctf-bench: error:" in err and message in err and "Traceback" not in err
    assert "building" not in err  # stopped before any model was built
    return err


@pytest.mark.parametrize("args, message", [
    (["--models", "foo"], "unknown timm model 'foo'"),
    (["--models", "deit_tiny_patch16_22"], "did you mean deit_tiny_patch16_224"),
    (["--models", "resnet18"], "resnet18: mctf.patch.timm supports timm VisionTransformer"),
    (["--models", "deit_tiny_patch16_224", "--model-kwargs", "img_size"], "key=value"),
    (["--models", "deit_tiny_patch16_224", "--model-kwargs", "bogus_arg=1"], "cannot create"),
    (["--models", "deit_tiny_patch16_224", "--r-sweep", "x"], "--r-sweep"),
    (["--models", "deit_tiny_patch16_224", "--r-sweep", "4", "0.5", "--r-sweep-method", "tome"], "whole number"),
    (["--models", "deit_tiny_patch16_224", "--r-sweep-method", "tome"], "give --r-sweep"),
    (["--models", "deit_tiny_patch16_224", "--repeats", "0"], "--repeats"),
    (["--models", "deit_tiny_patch16_224", "--providers", "eager", "--backend", "reference"], "shorthand"),
    (["--models", "deit_tiny_patch16_224", "--device", "gpu0"], "--device"),
])
def test_bad_input(args, message, capsys):
    _fails(args, capsys, message)


def torch_cuda():
    import torch

    return torch.cuda.is_available()


def test_bad_backend_env_and_triton_without_cuda(monkeypatch, capsys):
    monkeypatch.setenv("MCTF_BACKEND", "bogus")
    _fails(["--models", "deit_tiny_patch16_224"], capsys, "MCTF_BACKEND='bogus' is not a backend")
    monkeypatch.delenv("MCTF_BACKEND")
    if torch_cuda():
        return
    # asked for by name, the Triton provider on a CPU is an error (by default it is a skipped row)
    _fails(["--models", "deit_tiny_patch16_224", "--providers", "triton", "--device", "cpu"], capsys, "triton")
    _fails(["--models", "deit_tiny_patch16_224", "--backend", "triton", "--device", "cpu"], capsys, "triton")


def test_backend_env_picks_providers(tmp_path, monkeypatch):
    monkeypatch.setenv("MCTF_BACKEND", "reference")
    out = _run(tmp_path, "--presets", "baseline", "mctf", "--model-kwargs", "img_size=64", "depth=2")
    assert [r["provider"] for r in out["rows"]] == ["timm", "eager"]
    assert out["meta"]["model_kwargs"] == {"img_size": 64, "depth": 2}  # the later --model-kwargs wins


def test_table_flags_noisy_rows():
    row = dict(model="m", dtype="fp32", preset="mctf", provider="eager", gflops=1.0, images_per_s=10.0, ips_min=5.0,
               ips_max=20.0, speedup=1.9, ideal_speedup=1.7, achieved_over_ideal=1.12, peak_mem_mb=None, tokens="t",
               noisy=True, noisy_reasons=["spread 150% > 10%", "achieved/ideal 1.12 > 1.05"])
    text = bench_cli.format_table([row, dict(row, noisy=False, noisy_reasons=[], achieved_over_ideal=0.9)], 5)
    lines = text.splitlines()
    assert "NOISY, not a result: spread 150% > 10%; achieved/ideal 1.12 > 1.05" in lines[2]
    assert "1.90x?" in lines[2] and "1.12?" in lines[2] and "5.0-20.0" in lines[2]
    assert "NOISY" not in lines[3] and "1.90x " in lines[3]
    assert "1 row(s) NOISY" in text and "no data loading" in text


def test_tome_presets_side_by_side(tmp_path):
    """ToMe and MCTF presets in one run, on the same providers: GFLOPs and tokens follow r."""
    out = _run(tmp_path, "--presets", "baseline", "tome-r8", "tome-r16", "mctf", "--providers", "timm", "eager")
    rows = {r["preset"]: r for r in out["rows"]}
    assert set(rows) == {"baseline", "tome-r8", "tome-r16", "mctf"}
    assert rows["tome-r8"]["provider"] == "eager" and not rows["tome-r8"].get("error")
    # 17 tokens: both r are capped at half the mergeable tokens, so they merge alike
    assert rows["baseline"]["gflops"] > rows["tome-r8"]["gflops"] == rows["tome-r16"]["gflops"]


def test_tome_r_sweep(tmp_path):
    """--r-sweep-method tome sweeps ToMeConfig(r) in every block (not the mctf preset's layers)."""
    out = _run(tmp_path, "--presets", "baseline", "--providers", "timm", "eager", "--r-sweep", "0", "4", "16",
               "--r-sweep-method", "tome")
    sweep = out["r_sweep"]
    assert sweep["preset"] == "tome"
    by_r = {p["r"]: p for p in sweep["points"] if p["provider"] == "eager"}
    assert set(by_r) == {0, 4, 16} and all(p.get("images_per_s") for p in by_r.values())
    assert _close(by_r[0]["gflops"], sweep["baseline"]["gflops"])
    # 17 tokens, 2 blocks: r = 4 merges in both (17, 13, 9); r = 16 is capped at half (17, 9, 5)
    assert by_r[4]["final_tokens"] == 9 and by_r[16]["final_tokens"] == 5
    assert by_r[16]["gflops"] < by_r[4]["gflops"] < by_r[0]["gflops"]
