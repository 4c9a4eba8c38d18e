"""The ablation params and the `nll` stage: invalid combinations rejected before work, and
prepare → train (hybrid loss, learned variance, importance-sampled t) → sample → nll
through the Typer CLI on a tiny model."""

import json
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from helpers import tiny_params
from ddpm.checkpoint import load_checkpoint
from ddpm.model import load_model
from pipeline.cli import app
from pipeline.params.base import ParamsError, for_stage
from pipeline.params.schema import parse_params
from pipeline.stages import nll as nll_stage

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("changes,match", [
    ({"variance": "learned"}, r"variance=learned with loss=simple"),
    ({"loss": "hybrid"}, r"loss=hybrid with variance=fixed_small"),
    ({"loss": "hybrid", "variance": "fixed_large"}, r"loss=hybrid with variance=fixed_large"),
    ({"timestep_sampling": "importance"}, r"timestep_sampling=importance with loss=simple"),
    ({"loss": "elbo"}, r"loss: .*'simple'.*'vlb'.*'hybrid'"),
    ({"variance": "small"}, r"variance: .*'fixed_small'.*'fixed_large'.*'learned'"),
    ({"timestep_sampling": "stratified"}, r"timestep_sampling: .*'uniform'.*'importance'"),
    ({"hybrid_lambda": 0.0}, r"hybrid_lambda"),
])
def test_invalid_ablation_params_rejected(idx_dir, changes, match):
    raw = {**tiny_params(idx_dir), **changes}
    with pytest.raises(ParamsError, match=match):
        parse_params(raw)


def test_nll_stage_reads_only_nll(idx_dir):
    view = for_stage(parse_params(tiny_params(idx_dir)), nll_stage.KEYS, "nll")
    assert view.nll.num_images >= 1
    with pytest.raises(AttributeError, match="does not declare"):
        view.timesteps


def test_hybrid_learned_importance_through_the_cli(tmp_path, idx_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # prepare stages the IDX files under <working dir>/data/raw
    raw = tiny_params(idx_dir)
    raw.update(timesteps=20, loss="hybrid", variance="learned", timestep_sampling="importance")
    raw["train"].update(steps=8)
    raw["nll"] = {"num_images": 6, "batch_size": 4, "clip": "static", "seed": 0}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, [*args, "--params", str(params)])
        assert result.exit_code == 0, result.output
        return result

    data, model = tmp_path / "data", tmp_path / "model.pt"
    run("prepare", "--out", str(data))
    run("train", "--data", str(data / "train.pt"), "--out", str(model), "--metrics", str(tmp_path / "train.json"),
        "--plot", str(tmp_path / "loss.csv"), "--timing", str(tmp_path / "timing.json"), "--device", "cpu",
        "--state", str(tmp_path / "state.pt"), "--system-metrics", str(tmp_path / "system.json"))
    # the checkpoint alone rebuilds the 2×-channel network; the sampler state travels with it
    net, spec, _ = load_model(model)
    assert spec.variance == "learned" and net.conv_out.out_channels == 2
    ckpt = load_checkpoint(model)
    assert ckpt["timestep_sampler"]["kind"] == "importance" and int(ckpt["timestep_sampler"]["counts"].sum()) == 8 * 8
    assert ckpt["config"]["objective"] == {"loss": "hybrid", "hybrid_lambda": 1.0e-3, "timestep_sampling": "importance"}

    run("sample", "--checkpoint", str(model), "--sampler", "ddpm", "--steps", "3", "--out", str(tmp_path / "s"),
        "--device", "cpu")
    assert torch.load(tmp_path / "s" / "samples.pt")["images"].shape == (24, 1, 28, 28)

    metrics, plot = tmp_path / "nll.json", tmp_path / "nll_terms.csv"
    run("nll", "--checkpoint", str(model), "--data", str(data / "test.pt"), "--metrics", str(metrics),
        "--plot", str(plot), "--device", "cpu")
    m = json.loads(metrics.read_text())["nll"]
    assert m["test_images"] == 6 and m["timesteps"] == 20
    assert math.isfinite(m["bits_per_dim"]) and 0 < m["bits_per_dim"]
    rows = plot.read_text().splitlines()
    assert rows[0] == "t,bits_per_dim" and len(rows) == 21
    # the bound is its terms plus the prior, and the decoder term is the t = 0 row
    terms = [float(r.split(",")[1]) for r in rows[1:]]
    assert m["bits_per_dim"] == pytest.approx(sum(terms) + m["prior_bits_per_dim"], rel=1e-4)
    assert m["decoder_bits_per_dim"] == pytest.approx(terms[0], rel=1e-4)


def test_nll_command_names_a_missing_checkpoint(tmp_path, params_file):
    result = CliRunner().invoke(app, ["nll", "--params", str(params_file), "--checkpoint", str(tmp_path / "none.pt"),
                                      "--data", str(tmp_path / "test.pt"), "--device", "cpu"])
    assert result.exit_code == 1
    assert "error:" in result.output and "test.pt" in result.output
