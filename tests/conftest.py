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


# The quick subset, `python3 -m pytest -q -m "not slow" tests` (README, "Tests"), leaves out
# what takes seconds per test on a 2-core CPU: the Triton kernels under the interpreter,
# the ahead-of-time sm_90 compiles, whole models on every backend, and all but one of the
# public-code golden configurations (MCTF's and ToMe's). Tests in the CLI files carry their own marks.
SLOW_MODULES = {
    "test_triton_match.py", "test_triton_merge.py", "test_triton_attention.py",
    "test_triton_flash_attention.py", "test_kernels_compile_sm90.py", "test_model_backends.py",
    "test_training.py", "test_sm90_structure.py", "test_fused_layer_launches.py",
}
QUICK_GOLDEN = "test_reference_backend_matches_public_code[preset]"
QUICK_TOME = {"test_reference_backend_matches_tome[tiny_r16]", "test_golden_covers_every_option"}


def _slow(item) -> bool:
    module, name = item.path.name, item.name
    if module in SLOW_MODULES:
        return True
    if module == "test_golden_conformance.py":
        return name != QUICK_GOLDEN
    if module == "test_tome_conformance.py":  # ToMe's golden outputs: one model in the quick subset
        return name not in QUICK_TOME
    if module == "test_reference_ops.py" and item.originalname == "test_merge_properties":
        return item.callspec.params["T"] > 100  # the small cases keep the properties in the quick subset
    return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _slow(item):
            item.add_marker(pytest.mark.slow)
