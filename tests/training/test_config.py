"""Bad configurations fail before any work, with a message naming the key."""

import os

import pytest

from t2i.training.config import ConfigError, TrainConfig, from_dict, load_config
from tests.training.conftest import CONFIGS, TRAIN_PY


def _load(tmp_path, text: str, *overrides):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(str(path), list(overrides))[0]


GOOD = f"model: {{family: vqgan, stage: tokenizer}}\ndata: {{path: {os.getcwd()}}}\n"


@pytest.mark.parametrize("text, overrides, message", [
    (GOOD + "run: {stpes: 3}\n", (), r"unknown key 'config.run.stpes' \(did you mean "
                                     r"'config.run.steps'\?\)"),
    (GOOD, ("run.steps=ten",), r"run.steps: expected int, got 'ten'"),
    (GOOD, ("run.lr=[1]",), r"run.lr: expected float"),
    (GOOD, ("run.betas=[0.9]",), r"run.betas: expected 2 values"),
    (GOOD, ("run.progress=3",), r"run.progress: expected bool"),
    (GOOD, ("run.steps=0",), r"run.steps: must be >= 1"),
    (GOOD, ("run.schedule=linear",), r"run.schedule"),
    (GOOD, ("run.ema=1.5",), r"run.ema"),
    (GOOD, ("data.path=/no/such/dir", "data.synth_if_missing=0"),
     r"data.path: '/no/such/dir' does not exist"),
    ("model: {stage: tokenizer}\n", (), r"model.family: required"),
    (GOOD, ("steps",), r"expected key=value"),
    ("- a list\n", (), r"expected a mapping"),
])
def test_bad_configs_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, text, *overrides)


def test_overrides_reach_nested_values_with_yaml_types(tmp_path):
    config = _load(tmp_path, GOOD, "run.steps=7", "run.betas=[0.8, 0.95]", "model.num_codes=64",
                   "model.tokenizer=")
    assert config.run.steps == 7 and config.run.betas == (0.8, 0.95)
    assert config.model["num_codes"] == 64
    assert config.model["tokenizer"] == ""  # nothing after '=': the empty string, not None


def test_every_shipped_config_loads():
    names = [n for n in os.listdir(CONFIGS) if n.endswith(".yaml")]
    assert {"vqgan_shapes.yaml", "dvae_shapes.yaml", "vqseg_shapes.yaml", "muse_shapes.yaml",
            "muse_superres_shapes.yaml", "probe_shapes.yaml"} <= set(names)
    from t2i.models import get_family

    for name in names:
        config, _ = load_config(os.path.join(CONFIGS, name))
        assert isinstance(config, TrainConfig)
        family = get_family(config.model["family"])
        assert config.model["stage"] in family.STAGES, name
        keys = {k: v for k, v in config.model.items() if k not in ("family", "stage")}
        from_dict(family.CONFIG, keys, "model")  # every family key exists and has its type


def test_family_keys_are_checked_by_the_family_config():
    from t2i.models import get_family

    family = get_family("vqgan")
    with pytest.raises(ConfigError, match=r"unknown key 'model.num_code' \(did you mean "
                                          r"'model.num_codes'\?\)"):
        from_dict(family.CONFIG, {"num_code": 3}, "model")
    with pytest.raises(ValueError, match="unknown family 'gpt'"):
        get_family("gpt")


def test_train_py_reports_config_errors_before_any_work(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_py", TRAIN_PY)
    train_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_py)
    config = os.path.join(CONFIGS, "vqgan_shapes.yaml")
    assert train_py.main(["--config", config, "run.stpes=3"]) == 2
    assert "unknown key 'config.run.stpes'" in capsys.readouterr().err
    assert train_py.main(["--config", config, "model.stage=transformer",
                          f"run.out={tmp_path}/r", f"data.path={tmp_path}"]) == 2
    assert "model.stage: vqgan has stages tokenizer, not 'transformer'" in \
        capsys.readouterr().err
    assert train_py.main(["--config", config, "--deepspeed_config", "/no/such.json"]) == 2
    assert "--deepspeed_config /no/such.json: no such file" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r")  # nothing was started
