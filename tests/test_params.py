from pathlib import Path

import pytest
import yaml

from helpers import stage_keys
from pipeline.params.base import ParamsError, for_stage
from pipeline.params.schema import load_params, parse_params
from pipeline.stages import sample

REPO = Path(__file__).resolve().parents[1]


def test_default_params_are_valid():
    p = load_params(REPO / "params.yaml")
    assert p.schedule in ("linear", "cosine", "quadratic", "sigmoid")
    assert set(p.sample.samplers) <= set(p.samplers)


def raw():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_unknown_key_is_named():
    r = raw()
    r["train"]["learning_rate"] = 0.1
    with pytest.raises(ParamsError, match=r"train\.learning_rate: unknown key"):
        parse_params(r)
    r = raw()
    r["shedule"] = "cosine"
    with pytest.raises(ParamsError, match="shedule: unknown key"):
        parse_params(r)


def test_wrong_type_is_named():
    r = raw()
    r["train"]["steps"] = "many"
    with pytest.raises(ParamsError, match=r"train\.steps"):
        parse_params(r)


def test_invalid_choice_lists_allowed_values():
    r = raw()
    r["schedule"] = "exponential"
    with pytest.raises(ParamsError, match=r"schedule: .*'linear'.*'cosine'"):
        parse_params(r)
    r = raw()
    r["samplers"]["ddpm"]["variance"] = "huge"
    with pytest.raises(ParamsError, match=r"samplers\.ddpm.*variance.*fixed_small"):
        parse_params(r)


def test_sampler_names_must_be_defined():
    r = raw()
    r["sample"]["samplers"] = ["ddim", "nope"]
    with pytest.raises(ParamsError, match="nope"):
        parse_params(r)


def test_steps_beyond_T_rejected():
    r = raw()
    r["timesteps"] = 100
    r["sample"]["steps"] = [10, 1000]
    with pytest.raises(ParamsError, match=r"\[1000\]"):
        parse_params(r)


def test_float_written_as_yaml_string_is_accepted():
    r = raw()
    r["train"]["lr"] = "1e-4"  # PyYAML reads 1e-4 as a string
    assert parse_params(r).train.lr == pytest.approx(1e-4)


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")


def test_stage_view_refuses_undeclared_reads():
    p = load_params(REPO / "params.yaml")
    v = for_stage(p, sample.KEYS, "sample", sampler="ddim")
    assert v.sample.num_samples == p.sample.num_samples
    assert v.samplers["ddim"].kind == "ddim"
    with pytest.raises(AttributeError, match="does not declare"):
        v.train
    with pytest.raises(AttributeError, match="does not declare"):
        v.samplers["ddpm"]


def test_dvc_yaml_declares_exactly_what_stages_read():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, declared in stage_keys().items():
        assert stages[name]["params"] == declared, name
    # every stage uses the library (if only through the params schema) and depends on what it imports of it
    # (exactly: tests/test_dvc_deps.py)
    for name, stage in stages.items():
        assert any(d == "ddpm" or d.startswith("ddpm/") for d in stage["deps"]), name
