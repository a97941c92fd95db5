"""Test setup: Triton kernels run on CUDA when there is a GPU, and otherwise on
CPU tensors through Triton's interpreter, which must be switched on before any
kernel is defined (hence before mctf_kernels.triton is imported)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mctf_kernels  # noqa: E402

ON_CUDA = torch.cuda.is_available()


@pytest.fixture
def device() -> str:
    return "cuda" if ON_CUDA else "cpu"


@pytest.fixture
def triton_backend():
    """Force the Triton backend for one test (never silently the reference)."""
    with mctf_kernels.use_backend("triton"):
        yield


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(0)
    yield
