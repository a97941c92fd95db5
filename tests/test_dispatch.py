"""Backend dispatch: the Triton backend never falls back silently, auto does and says why."""
import warnings

import pytest
import torch

import mctf_kernels as mk
from mctf_kernels import dispatch
from mctf_kernels.triton import LAUNCHERS

ON_CUDA = torch.cuda.is_available()


def _inputs(device):
    x = torch.randn(2, 17, 16, device=device)
    attn = torch.softmax(torch.randn(2, 2, 17, 17, device=device), -1)
    return x, attn


def test_every_op_has_a_triton_launcher():
    assert set(LAUNCHERS) == {"match", "merge", "attention_received", "fused_attention_output",
                              "fusion_attention", "fused_attention_output_qk", "slot_index"}


def test_triton_backend_launches_the_kernels(device, monkeypatch):
    """Count launcher calls: the model-facing ops really ran the Triton path."""
    calls = []
    for name, fn in list(LAUNCHERS.items()):
        monkeypatch.setitem(LAUNCHERS, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    x, attn = _inputs(device)
    with mk.use_backend("triton"):
        received = mk.attention_received(attn)
        dest = mk.match(x, 4, received, None)
        out, size, _ = mk.merge(x, dest, 13, None, received, mode=1)
        v = torch.randn(2, 2, 13, 8, device=device)
        mk.fused_attention_output(attn, v, dest, 13, None, received, mode=1)
    assert calls == ["attention_received", "match", "merge", "fused_attention_output"]
    assert torch.equal(dest, mk.match_reference(x, 4, received, None))


def test_reference_backend_never_launches(device, monkeypatch):
    for name in list(LAUNCHERS):
        monkeypatch.setitem(LAUNCHERS, name, lambda *a, **k: pytest.fail("Triton launcher called"))
    x, attn = _inputs(device)
    with mk.use_backend("reference"):
        dest = mk.match(x, 4, mk.attention_received(attn), None)
        mk.merge(x, dest, 13, mode=0)


@pytest.mark.skipif(ON_CUDA, reason="checks CPU routing")
def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, _ = _inputs("cpu")
    with mk.use_backend("triton"), pytest.raises(mk.BackendUnavailable, match="need a CUDA tensor"):
        mk.match(x, 4)


@pytest.mark.skipif(ON_CUDA, reason="checks CPU routing")
def test_auto_on_cpu_uses_reference_quietly(monkeypatch):
    for name in list(LAUNCHERS):
        monkeypatch.setitem(LAUNCHERS, name, lambda *a, **k: pytest.fail("Triton launcher called"))
    x, _ = _inputs("cpu")
    with mk.use_backend("auto"), warnings.catch_warnings():
        warnings.simplefilter("error")
        mk.match(x, 4)


def test_unsupported_option_raises_under_triton(device):
    x, attn = _inputs(device)
    received = mk.attention_received_reference(attn)
    dest = mk.match_reference(x, 4, received, None)
    v = torch.randn(2, 2, 13, 8, device=device)
    with mk.use_backend("triton"), pytest.raises(mk.BackendUnavailable, match="max pooling"):
        mk.fused_attention_output(attn, v, dest, 13, None, received, mode=2)


@pytest.mark.skipif(not ON_CUDA, reason="auto falls back (with a warning) only on CUDA")
def test_auto_warns_once_with_reason():
    x, attn = _inputs("cuda")
    received = mk.attention_received_reference(attn)
    dest = mk.match_reference(x, 4, received, None)
    v = torch.randn(2, 2, 13, 8, device="cuda")
    dispatch._warned.clear()
    with mk.use_backend("auto"):
        with pytest.warns(UserWarning, match="max pooling"):
            mk.fused_attention_output(attn, v, dest, 13, None, received, mode=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mk.fused_attention_output(attn, v, dest, 13, None, received, mode=2)
