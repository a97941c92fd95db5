"""Regenerate tests/data/golden/tome_public.pt: outputs of Token Merging's public code
(github.com/facebookresearch/ToMe, its timm patch) on the models, weights and images of
tests/tome_golden.py, on CPU in float32. None of ToMe's code is in this repository: pass
the folder that holds its ``tome`` package.

    python3 tests/data/make_tome_golden.py --tome-path /path/to/ToMe   # [TOME_COMMIT=<sha> if not a git checkout]

Besides the outputs it records, per configuration, the smallest score margin of any
decision ToMe made (the gap between the last merged and the first kept A token, and
between the best and second-best destination of every merged token): a decision closer
than float32 rounding would make the golden depend on the summation order.
"""
import argparse
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for tome_golden
import tome_golden as G  # noqa: E402


def _commit(path: str) -> str:
    """The ToMe commit the outputs came from: $TOME_COMMIT (a checkout without .git), else git's."""
    if os.environ.get("TOME_COMMIT"):
        return os.environ["TOME_COMMIT"]
    git = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True)
    return git.stdout.strip() if git.returncode == 0 else "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tome-path", required=True, help="folder containing ToMe's `tome` package")
    ap.add_argument("--output", default=os.path.join(HERE, "golden", "tome_public.pt"))
    args = ap.parse_args()
    sys.path.insert(0, args.tome_path)
    import timm
    import tome

    tome_timm = sys.modules["tome.patch.timm"]  # the package attribute is its apply_patch

    torch.set_num_threads(1)  # one summation order for the record
    margins = []
    matcher = tome_timm.bipartite_soft_matching

    def recording_matcher(metric, r, class_token=False, distill_token=False):
        # the same scores ToMe computes, to measure how close its decisions were
        protected = int(class_token) + int(distill_token)
        t = metric.shape[1]
        rr = min(r, (t - protected) // 2)
        if rr > 0:
            m = metric / metric.norm(dim=-1, keepdim=True)
            s = m[..., ::2, :] @ m[..., 1::2, :].transpose(-1, -2)
            if class_token:
                s[..., 0, :] = float("-inf")
            if distill_token:
                s[..., :, 0] = float("-inf")
            node_max = s.max(dim=-1).values
            order = node_max.sort(dim=-1, descending=True)
            # every A token merged (no prefix token, even T): no kept/merged boundary to measure
            margin = float("inf")
            if rr < s.shape[-2]:
                margin = (order.values[..., rr - 1] - order.values[..., rr]).min().item()
            if s.shape[-1] > 1:  # one B token: no choice of destination
                top2 = s.topk(2, dim=-1).values
                src = order.indices[..., :rr]
                margin = min(margin, (top2[..., 0] - top2[..., 1]).gather(-1, src).min().item())
            margins.append(margin)
        return matcher(metric, r, class_token, distill_token)

    tome_timm.bipartite_soft_matching = recording_matcher
    x = G.images()
    data = {"meta": {"tome_commit": _commit(args.tome_path), "timm": timm.__version__,
                     "torch": str(torch.__version__), "seed": G.SEED},
            "checksums": {}, "cases": []}
    for name, key, r, prop_attn, trace in G.CASES:
        model = G.build_model(key)
        data["checksums"][key] = G.checksum(model)
        tome.patch.timm(model, trace_source=trace, prop_attn=prop_attn)
        model.r = r
        counts, features = [], []
        for blk in model.blocks:
            blk.register_forward_hook(lambda mod, inp, out: counts.append(out.shape[1]))
        model.norm.register_forward_hook(lambda mod, inp, out: features.append(out.clone()))
        margins.clear()
        with torch.no_grad():
            logits = model(x)
        info = model._tome_info
        case = {
            "name": name, "model": key, "r": r, "prop_attn": prop_attn, "trace_source": trace,
            "logits": logits, "tokens_per_block": counts,
            "final_size": None if info["size"] is None else info["size"][..., 0].clone(),
            "source_owner": G.owner_from_source(info["source"]) if trace and info["source"] is not None else None,
            "min_margin": min(margins) if margins else None,
            # the final tokens before the head, where the logits differ by design
            "features": features[-1] if key in G.FEATURES_ONLY else None,
        }
        print(f"{name:28s} tokens {counts[-1]:4d}  min decision margin {case['min_margin']}")
        data["cases"].append(case)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    torch.save(data, args.output)
    print("wrote", args.output, os.path.getsize(args.output), "bytes")


if __name__ == "__main__":
    main()
