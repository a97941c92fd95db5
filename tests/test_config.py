import pytest

import mctf
from mctf import MCTFConfig


def test_presets_follow_the_paper():
    assert MCTFConfig.preset("mctf").to_mctf_type() == [16, 0, 0, 1, 1, 1, 20, 40, 1, 1, 0]
    assert MCTFConfig.preset("mctf").active_layers(12) == tuple(range(1, 12))
    assert MCTFConfig.preset("mctf", depth=12).layers == tuple(range(1, 12))
    fast = MCTFConfig.preset("mctf-fast", depth=12)
    assert fast.to_mctf_type() == [0.35, 0, 0, 1, 1, 1, 20, 40, 1, 1, 0]
    assert fast.layers == (3, 6, 9)
    assert MCTFConfig.preset("mctf", depth=24).layers == tuple(range(1, 24))
    assert MCTFConfig.preset("mctf-fast", depth=24).layers == (6, 12, 18)


def test_mctf_type_round_trip():
    values = [16, 8, 0, 1, 1, 1, 20, 40, 1, 1, 0]
    config = MCTFConfig.from_mctf_type(values, activate_layer=[1, 2, 3])
    assert config.to_mctf_type() == values
    assert config.layers == (1, 2, 3) and config.r_teacher_max == 8
    assert MCTFConfig.from_mctf_type([0.35, 0, 1, 0, 2, 2, 10, 5, 0, 3, 0]) == MCTFConfig(
        r=0.35, layers=None, trace_source=True, prop_attn=False, one_step_ahead=2, tau_sim=2, tau_info=10,
        tau_size=5, bidirectional=False, pooling=3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=-1), "r must be"), (dict(pooling=4), "pooling"), (dict(one_step_ahead=3), "one_step_ahead"),
    (dict(tau_sim=-1), "tau_sim"), (dict(layers=(-1,)), "layers"), (dict(r="16"), "r must be"),
    # issue 9, "accepted nonsense"
    (dict(r=float("nan")), "r must be"), (dict(r=float("inf")), "r must be"),
    (dict(layers=5), r"layers must be a sequence.*\(5,\)"), (dict(layers="123"), "layers must be a sequence"),
    (dict(tau_info=float("nan")), "tau_info"), (dict(tau_size=float("inf")), "tau_size"),
    (dict(pooling=1.0), "pooling"), (dict(one_step_ahead=1.0), "one_step_ahead"),
    (dict(r_teacher_max=float("nan")), "r_teacher_max"), (dict(preset_layers="tome"), "preset_layers"),
    (dict(layers=(1, 2), preset_layers="mctf"), "not both"),
])
def test_invalid_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MCTFConfig(**kwargs)


def test_presets_follow_the_model_depth():
    """A preset made without depth resolves its blocks when patched, as the CLIs do."""
    for depth in (4, 16, 24):
        assert MCTFConfig.preset("mctf").for_depth(depth).layers == tuple(range(1, depth))
        assert MCTFConfig.preset("mctf").for_depth(depth) == MCTFConfig.preset("mctf", depth=depth)
        assert MCTFConfig.preset("mctf-fast").for_depth(depth) == MCTFConfig.preset("mctf-fast", depth=depth)
    assert MCTFConfig.preset("mctf-fast").active_layers(24) == (6, 12, 18)
    # explicit blocks replace the preset's rule, in preset() and in replace()
    assert MCTFConfig.preset("mctf", layers=(2,)).active_layers(24) == (2,)
    assert MCTFConfig.preset("mctf").replace(layers=(3,)).active_layers(24) == (3,)
    assert MCTFConfig.preset("mctf").replace(r=8).active_layers(24) == tuple(range(1, 24))
    with pytest.raises(ValueError, match="depth"):
        MCTFConfig.preset("mctf").active_layers(0)


def test_bad_preset_and_list():
    with pytest.raises(ValueError, match="unknown preset"):
        MCTFConfig.preset("tome")
    with pytest.raises(ValueError, match="11 entries"):
        MCTFConfig.from_mctf_type([16, 0, 0])


def test_backend_selection(monkeypatch):
    monkeypatch.setenv("MCTF_BACKEND", "reference")
    mctf.set_backend(None)
    assert mctf.get_backend() == "reference"
    with mctf.use_backend("triton"):
        assert mctf.get_backend() == "triton"
    assert mctf.get_backend() == "reference"
    monkeypatch.setenv("MCTF_BACKEND", "cuda")
    with pytest.raises(ValueError, match="MCTF_BACKEND"):
        mctf.get_backend()
    with pytest.raises(ValueError, match="backend"):
        mctf.set_backend("fast")
