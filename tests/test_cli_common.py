"""The CLIs' shared pieces: argument conventions, --help without torch, and the measurement
methodology (warmup, interleaving, median and spread, noisy flags) on synthetic timings."""
import argparse
import ast
import os
import pathlib
import subprocess
import sys

import pytest

from mctf.cli import common

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOLS = ("bench", "eval", "visualize", "train")
# mctf-train evaluates with mctf-eval's loop and folder checks: one copy of the evaluation
ALLOWED_IMPORTS = {("train", "eval")}


# ---------------------------------------------------------------------------
# arguments


def test_model_kwargs_timm_style_and_json():
    assert common.parse_model_kwargs(["img_size=384", "depth=6", "global_pool=avg", "drop_rate=0.1",
                                      "qk_norm=True", "dynamic_img_size=False"]) == dict(
        img_size=384, depth=6, global_pool="avg", drop_rate=0.1, qk_norm=True, dynamic_img_size=False)
    assert common.parse_model_kwargs(["img_size=(224, 320)"]) == dict(img_size=(224, 320))
    assert common.parse_model_kwargs(['{"img_size": 384, "depth": 6}']) == dict(img_size=384, depth=6)
    assert common.parse_model_kwargs([]) == {}
    for bad, message in ((["img_size"], "key=value"), (["=3"], "key=value"), (["{img_size: 3"], "not valid JSON"),
                         (["[1, 2]"], "key=value"), (['{"a": 1} x'], "not valid JSON")):
        with pytest.raises(common.UsageError, match=message):
            common.parse_model_kwargs(bad)


def test_parse_r_values():
    assert common.parse_r_values(["0", "16", "0.35", "1.0"]) == [0, 16, 0.35, 1]
    for bad, message in ((["-1"], "token count"), (["1.5"], "fraction"), (["x"], "not a number"),
                         (["nan"], "not a number")):
        with pytest.raises(common.UsageError, match=message):
            common.parse_r_values(bad)


def test_backends_match_mctf_kernels(monkeypatch):
    import mctf_kernels

    assert common.BACKENDS == tuple(mctf_kernels.BACKENDS)
    monkeypatch.setenv("MCTF_BACKEND", " Reference ")
    assert common.backend_from_env() == "reference"
    monkeypatch.setenv("MCTF_BACKEND", "")
    assert common.backend_from_env() is None
    monkeypatch.setenv("MCTF_BACKEND", "bogus")
    with pytest.raises(common.UsageError, match="MCTF_BACKEND='bogus' is not a backend"):
        common.backend_from_env()


def test_default_workers_never_exceed_the_machine():
    assert 1 <= common.default_workers() <= min(8, common.available_cpus())


def _parser(tool):
    import importlib

    return importlib.import_module(f"mctf.cli.{tool}").build_parser()


@pytest.mark.parametrize("tool", TOOLS)
def test_every_option_has_help_and_no_markup(tool):
    parser = _parser(tool)
    text = parser.format_help()
    assert "``" not in text and ":mod:" not in text and ":func:" not in text
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        assert action.help, action.option_strings
        if action.default is not None and action.default is not False:  # shown unless the help names it
            assert "default" in common.HelpFormatter("x")._get_help_string(action), action.option_strings


def test_timm_aliases():
    from mctf.cli import bench, eval as eval_cli, visualize

    args = eval_cli.build_parser().parse_args(["-m", "vit_small_patch16_224", "-b", "7", "-j", "3", "--pretrained",
                                               "--data-path", "x", "--model-kwargs", "img_size=384", "--compile"])
    assert (args.model, args.batch_size, args.workers, args.pretrained, args.compile) == (
        "vit_small_patch16_224", 7, 3, True, True)
    assert args.model_kwargs == ["img_size=384"]
    assert eval_cli.build_parser().parse_args(["-m", "x", "--data-path", "y"]).workers == common.default_workers()
    args = bench.build_parser().parse_args(["-m", "a", "b", "-b", "4"])
    assert (args.models, args.batch_size) == (["a", "b"], 4)
    args = visualize.build_parser().parse_args(["--demo", "-o", "x.png", "-m", "deit_small_patch16_224", "--pretrained"])
    assert (args.model, args.pretrained) == ("deit_small_patch16_224", True)


def test_no_cli_imports_another_and_no_shims():
    for tool in TOOLS:
        tree = ast.parse((ROOT / "mctf" / "cli" / f"{tool}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        others = {f"mctf.cli.{t}" for t in TOOLS if t != tool and (tool, t) not in ALLOWED_IMPORTS}
        assert not imported & others, (tool, imported & others)
    assert not (ROOT / "mctf" / "bench_cli.py").exists() and not (ROOT / "mctf" / "eval_cli.py").exists()


@pytest.mark.parametrize("tool", TOOLS)
def test_help_does_not_import_torch(tool):
    code = (f"import sys\nfrom mctf.cli import {tool} as t\n"
            "try:\n    t.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print('TORCH' if 'torch' in sys.modules or 'timm' in sys.modules else 'CLEAN')")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "CLEAN"
    assert "usage:" in proc.stdout


# ---------------------------------------------------------------------------
# measurement methodology


def test_summarize_median_range_spread():
    # seconds per forward of 5 repeats, batch 10 -> images/s 100, 50, 200, 100, 125
    s = common.summarize([0.1, 0.2, 0.05, 0.1, 0.08], batch=10)
    assert s["images_per_s"] == pytest.approx(100.0)
    assert (s["ips_min"], s["ips_max"]) == (pytest.approx(50.0), pytest.approx(200.0))
    assert s["spread"] == pytest.approx(1.5)  # (200 - 50) / 100
    assert s["ips_q1"] == pytest.approx(100.0) and s["ips_q3"] == pytest.approx(125.0)
    assert s["repeats"] == 5
    one = common.summarize([0.5], batch=2)
    assert one["images_per_s"] == 4.0 and one["spread"] == 0.0
    assert common.summarize([], batch=2)["images_per_s"] is None


def test_paired_ratio_cancels_drift():
    # the machine slows down 2x over the run; both rows suffer it alike in each round
    drift = [1.0, 1.2, 1.5, 2.0]
    base = [0.10 * d for d in drift]
    fast = [0.05 * d for d in drift]
    r = common.paired_ratio(fast, base)
    assert r["ratio"] == pytest.approx(2.0) and r["ratio_min"] == pytest.approx(2.0)
    assert r["ratio_max"] == pytest.approx(2.0)
    # while the ratio of the medians of unpaired rows would not be 2 if their rounds differed
    assert common.summarize(fast, 1)["spread"] > 0.5


def test_noisy_reasons():
    assert common.noisy_reasons(0.05, 0.10, 0.95, True, 5) == []
    assert common.noisy_reasons(0.25, 0.10, None, True, 5) == ["spread 25% > 10%"]
    assert common.noisy_reasons(0.01, 0.10, 1.06, True, 5) == ["achieved/ideal 1.06 > 1.05"]
    assert common.noisy_reasons(0.01, 0.10, 1.05, True, 5) == []
    assert common.noisy_reasons(0.01, 0.10, None, False, 5) == ["warmup did not settle"]
    assert common.noisy_reasons(None, 0.10, None, None, 1) == ["no warmup", "one repeat"]


def test_interleaved_order():
    assert common.interleaved_order(["A", "B", "C"], 2) == [(0, "A"), (0, "B"), (0, "C"), (1, "A"), (1, "B"), (1, "C")]


class FakeClock:
    """A clock and a timer driven by scripted per-call durations (no real time passes)."""

    def __init__(self, durations):
        self.durations = {k: list(v) for k, v in durations.items()}
        self.now = 0.0
        self.calls = []

    def clock(self):
        return self.now

    def timer(self, step, iters, device):
        label = step()
        self.calls.append((label, iters))
        total = sum(self.durations[label].pop(0) if len(self.durations[label]) > 1 else self.durations[label][0]
                    for _ in range(iters))
        self.now += total
        return total


def test_warmup_runs_until_stable_and_minimums():
    # slow first passes (compilation, caches), then steady at 0.1 s
    fake = FakeClock({"A": [3.0, 1.0, 0.5, 0.1, 0.1, 0.1]})
    w = common.warmup(lambda: "A", None, min_iters=3, min_seconds=0.0, max_seconds=100, clock=fake.clock,
                      timer=fake.timer)
    assert w["stable"] is True and w["iters"] == 6 and w["iter_seconds"] == pytest.approx(0.1)
    # minimum time: stable after 3 passes, but 1 s must pass
    fake = FakeClock({"A": [0.125]})
    w = common.warmup(lambda: "A", None, min_iters=3, min_seconds=1.0, max_seconds=100, clock=fake.clock,
                      timer=fake.timer)
    assert w["stable"] is True and w["iters"] == 8
    # never settles: gives up after max_seconds, flagged
    fake = FakeClock({"A": [0.1, 0.3] * 50})
    w = common.warmup(lambda: "A", None, min_iters=3, min_seconds=0.0, max_seconds=2.0, clock=fake.clock,
                      timer=fake.timer)
    assert w["stable"] is False and fake.now >= 2.0
    assert common.warmup(lambda: "A", None, 0, 0.0, 1.0, timer=fake.timer)["stable"] is None


def test_measure_interleaved_alternates_rows_with_fixed_iterations():
    fake = FakeClock({"A": [0.1], "B": [0.05]})
    out = common.measure_interleaved({"A": lambda: "A", "B": lambda: "B"}, None, repeats=3, repeat_seconds=0.5,
                                     max_iters=1000, warmup_iters=3, warmup_seconds=0.0, warmup_max_seconds=10,
                                     timer=fake.timer)
    timed = [c for c in fake.calls if c[1] > 1]
    assert timed == [("A", 5), ("B", 10)] * 3  # A B A B A B, iterations fixed from the warmup
    assert out["A"]["seconds_per_iter"] == pytest.approx([0.1] * 3)
    assert out["B"]["iters_per_repeat"] == 10 and out["B"]["warmup"]["stable"] is True
    # setups run (untimed) before every warmup and repeat of their row
    seen = []
    fake = FakeClock({"A": [0.1], "B": [0.1]})
    common.measure_interleaved({"A": lambda: "A", "B": lambda: "B"}, None, repeats=2, repeat_seconds=0.0,
                               max_iters=1, warmup_iters=0, warmup_seconds=0.0, warmup_max_seconds=1,
                               setups={"A": lambda: seen.append("A"), "B": lambda: seen.append("B")},
                               timer=fake.timer)
    assert seen == ["A", "B", "A", "B", "A", "B"]
