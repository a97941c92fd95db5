"""Plot images/s against r from an ``mctf-bench --r-sweep`` results JSON.

    python bench/plot.py bench/results/<device>-<date>.json [-o out.png]

One line per MCTF provider (eager reference, Triton) with the repeats' min-max
range as error bars, the timm baseline as a horizontal line. matplotlib is needed here only (extras "bench").
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def plot(results: dict, out_path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    sweep = results.get("r_sweep")
    if not sweep or not sweep.get("points"):
        raise SystemExit("no r_sweep section in the results (run mctf-bench with --r-sweep 0 4 8 12 16 20)")
    meta = results.get("meta", {})
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    providers = list(dict.fromkeys(p["provider"] for p in sweep["points"]))
    notes = []
    for provider in providers:
        pts = sorted((p for p in sweep["points"] if p["provider"] == provider and p.get("images_per_s")),
                     key=lambda p: p["r"])
        if not pts:
            reasons = {p.get("skipped") or p.get("error") for p in sweep["points"] if p["provider"] == provider}
            notes.append(f"{provider}: not measured ({'; '.join(sorted(r for r in reasons if r))})")
            continue
        label = {"eager": "MCTF eager reference", "triton": "MCTF Triton"}.get(provider, f"MCTF {provider}")
        ys = [p["images_per_s"] for p in pts]
        if all(p.get("ips_min") is not None for p in pts):  # the repeats' min-max range
            yerr = [[y - p["ips_min"] for y, p in zip(ys, pts)], [p["ips_max"] - y for y, p in zip(ys, pts)]]
        else:
            yerr = None
        ax.errorbar([p["r"] for p in pts], ys, yerr=yerr, marker="o", capsize=3, label=label)
    base = sweep.get("baseline") or {}
    if base.get("images_per_s"):
        ax.axhline(base["images_per_s"], color="gray", linestyle="--", label="timm baseline (SDPA)")
    ax.set_xlabel("r (tokens removed per layer, every block: ToMe)" if sweep.get("preset") == "tome"
                  else "r (tokens removed per layer, mctf preset's layers)")
    ax.set_ylabel("images / s")
    precision = f"{sweep['dtype']}{' autocast' if sweep.get('amp') else ''}"
    if meta.get("device_type") == "cpu":  # CPU figures depend on threads and on the machine's load
        precision += f", CPU {meta.get('threads')} thread(s), load {meta.get('load_average_1_5_15', ['?'])[0]:.1f}"
    ax.set_title(f"{sweep['model']}, batch {sweep['batch']}, {precision}\n"
                 f"{meta.get('device_name', '?')}, {meta.get('date', '?')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=6, va="bottom")
        fig.subplots_adjust(bottom=0.12 + 0.03 * len(notes))
    fig.tight_layout(rect=(0, 0.04 * len(notes), 1, 1))
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="results JSON written by mctf-bench --r-sweep ... --json/--save")
    p.add_argument("-o", "--output", help="PNG path (default: the results path with -r-sweep.png)")
    args = p.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    out = args.output or os.path.splitext(args.results)[0] + "-r-sweep.png"
    print(plot(results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
