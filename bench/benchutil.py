"""Helpers shared by bench/conftest.py and the benchmark modules (importable as
``benchutil`` because pytest puts bench/ on sys.path)."""
from __future__ import annotations

import os

import torch

SMOKE_ENV = "MCTF_BENCH_SMOKE"


def smoke_enabled(config) -> bool:
    return bool(config.getoption("--cpu-smoke")) or os.environ.get(SMOKE_ENV, "0") not in ("", "0")


def device_name(device: torch.device) -> str:
    # mctf.cli.common imports neither torch's ops nor Triton at import time, but the
    # model layer it calls must not load before conftest switches the interpreter on
    from mctf.cli.common import device_name as name

    return name(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
