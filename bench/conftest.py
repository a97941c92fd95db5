"""Kernel microbenchmarks (pytest-benchmark), collected only by ``pytest bench/``.

On CUDA every op runs at the paper's shapes. Without CUDA the suite skips,
unless ``--cpu-smoke`` (or ``MCTF_BENCH_SMOKE=1``) asks for the smoke mode: tiny
shapes on CPU, one round each, Triton through its interpreter, so CI proves the
suite runs. Smoke timings mean nothing and are labelled so.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import statistics
import time

import pytest
import torch

from benchutil import SMOKE_ENV, device_name, smoke_enabled, sync


def pytest_addoption(parser):
    group = parser.getgroup("mctf-bench")
    group.addoption(
        "--cpu-smoke", action="store_true", default=False,
        help="run every op/provider once on tiny CPU shapes (Triton via TRITON_INTERPRET=1); "
             f"same as {SMOKE_ENV}=1",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: kernel microbenchmark (pytest bench/)")
    if smoke_enabled(config):
        # the interpreter must be on before any Triton kernel is defined; the
        # launchers are imported lazily by dispatch, i.e. after this hook
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.fixture(scope="session")
def smoke(pytestconfig) -> bool:
    return smoke_enabled(pytestconfig)


@pytest.fixture(scope="session")
def bench_device(smoke) -> torch.device:
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("kernel benchmarks need CUDA; use --cpu-smoke (or MCTF_BENCH_SMOKE=1) for the CPU smoke run")
    return torch.device("cuda")


@pytest.fixture(scope="session")
def copy_bandwidth(bench_device, smoke) -> dict:
    """The device's copy ceiling: a large device-to-device ``copy_``, GB/s counting
    read + write (the same convention as every op's bytes moved)."""
    nbytes = (32 << 20) if smoke else (1 << 30)  # 1 GiB: far past L2, so DRAM-bound
    src = torch.empty(nbytes, dtype=torch.uint8, device=bench_device).random_(0, 255)
    dst = torch.empty_like(src)
    times = []
    for i in range(2 if smoke else 25):
        sync(bench_device)
        if bench_device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t0
        if i > 0:  # first copy warms up
            times.append(seconds)
    median = statistics.median(times)
    del src, dst
    return dict(bytes=2 * nbytes, median_ms=median * 1e3, gbps=2 * nbytes / median / 1e9,
                device=device_name(bench_device), smoke=smoke)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Every result file names the device, the versions and the date."""
    smoke = smoke_enabled(config)
    dev = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    machine_info["mctf"] = dict(
        device=device_name(dev), device_type=dev.type, smoke=smoke,
        torch=torch.__version__, triton=_version("triton"), timm=_version("timm"),
        cuda=torch.version.cuda, date=datetime.date.today().isoformat(),
        triton_interpret=os.environ.get("TRITON_INTERPRET"),
    )
