"""Render mctf-bench result files as a markdown table (to paste into README).

    python bench/readme_table.py bench/results/*.json [--all]

One row per measured (model, dtype, preset, provider) that is a result; ``--all``
also lists rows that were skipped, failed or flagged noisy, with the reason
(bench/NOTES.md, "How we measure").
"""
from __future__ import annotations

import argparse
import json
import sys


def _num(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def render(results: list, include_all: bool = False) -> str:
    lines = [
        "| device | model | dtype | batch | preset | provider | GFLOPs | img/s | range | speedup | ideal | achieved/ideal | peak MiB |",
        "| --- | --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    sources = []
    for res in results:
        meta = res.get("meta", {})
        device = meta.get("device_name", "?")
        sources.append(f"{device}, {meta.get('date', res.get('date', '?'))}, torch {meta.get('torch', res.get('torch'))}, "
                       f"triton {meta.get('triton')}, timm {meta.get('timm')}")
        for r in res["rows"]:
            ips = r.get("images_per_s")
            if (not ips or r.get("noisy")) and not include_all:
                continue
            dtype = r["dtype"] + (" amp" if r.get("amp") else "")
            img = _num(ips, ".1f") if ips else ("skipped: " + r["skipped"] if r.get("skipped") else f"error: {r.get('error')}")
            if r.get("noisy"):
                img += " (noisy: " + "; ".join(r.get("noisy_reasons", [])) + ")"
            rng = f"{r['ips_min']:.1f}-{r['ips_max']:.1f}" if ips and r.get("ips_min") is not None else "-"
            lines.append(
                f"| {device} | {r['model']} | {dtype} | {r['batch']} | {r['preset']} | {r['provider']} | "
                f"{_num(r.get('gflops'), '.2f')} | {img} | {rng} | {_num(r.get('speedup'), '.2f', 'x')} | "
                f"{_num(r.get('ideal_speedup'), '.2f', 'x')} | {_num(r.get('achieved_over_ideal'), '.2f')} | "
                f"{_num(r.get('peak_mem_mb'), '.0f')} |"
            )
    notes = "\n".join(f"- {s}" for s in dict.fromkeys(sources))
    return "\n".join(lines) + "\n\nMeasured on:\n" + notes + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="JSON files written by mctf-bench --json/--save")
    p.add_argument("--all", action="store_true", help="also list skipped, failed and noisy rows")
    args = p.parse_args(argv)
    results = []
    for path in args.results:
        with open(path) as f:
            results.append(json.load(f))
    sys.stdout.write(render(results, args.all))
    return 0


if __name__ == "__main__":
    sys.exit(main())
