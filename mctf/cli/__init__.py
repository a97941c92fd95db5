"""Command-line tools: ``mctf-bench`` (:mod:`mctf.cli.bench`), ``mctf-eval``
(:mod:`mctf.cli.eval`), ``mctf-visualize`` (:mod:`mctf.cli.visualize`) and
``mctf-train`` (:mod:`mctf.cli.train`).

Each tool parses its arguments before importing torch or timm, so ``--help`` and
usage errors are instant. What they share (model building, GFLOPs, device names,
data config, result files, how throughput is measured) is :mod:`mctf.cli.common`.
``mctf-train`` evaluates with ``mctf-eval``'s loop and folder checks (imported from
:mod:`mctf.cli.eval`, one copy); no other tool imports another.
"""
