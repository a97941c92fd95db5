"""Helpers shared by bench/conftest.py and the benchmark modules (importable as
``benchutil`` because pytest puts bench/ on sys.path)."""
from __future__ import annotations

import os
import platform

import torch

SMOKE_ENV = "MCTF_BENCH_SMOKE"


def smoke_enabled(config) -> bool:
    return bool(config.getoption("--cpu-smoke")) or os.environ.get(SMOKE_ENV, "0") not in ("", "0")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
