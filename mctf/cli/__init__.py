"""Command-line tools: ``mctf-bench`` (:mod:`mctf.cli.bench`), ``mctf-eval``
(:mod:`mctf.cli.eval`) and ``mctf-visualize`` (:mod:`mctf.cli.visualize`).

Each tool parses its arguments before importing torch or timm, so ``--help`` and
usage errors are instant. What they share (model building, GFLOPs, device names,
data config, result files, how throughput is measured) is :mod:`mctf.cli.common`;
no tool imports another.
"""
