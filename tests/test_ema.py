"""Weight averaging (ddpm.ema) and post-hoc EMA (ddpm.posthoc_ema): every rule against its
closed form, EDM2's least squares against what was tracked directly, and the behaviour
that matters: after a short training the EMA weights denoise held-out images at least as
well as the raw weights (and the old fixed decay with a long horizon does not)."""

import json
import math

import pytest
import torch
import yaml
from helpers import synthetic_images
from tiny import CLASSES, cli, errors, workspace, write_params

from ddpm.checkpoint import load_checkpoint
from ddpm.data import Split, save_split
from ddpm.config.training import MAX_SIGMA_REL, MAX_SNAPSHOTS, check_schedule, snapshot_steps
from ddpm.ema import (FixedEMA, PowerEMA, WarmupEMA, averaged_model, averaged_weights, decay,
                      sigma_rel_to_gamma)
from ddpm.model import ModelSpec
from ddpm.posthoc_ema import (posthoc_ema, power_profile, snapshot, solve, solve_coefficients)
from ddpm.training import TrainConfig, init_state, train
from ddpm.unet import UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def gamma_to_sigma_rel(gamma: float) -> float:
    """σ_rel = sqrt((γ+1) / ((γ+2)² (γ+3))) (EDM2 eq. 123), the closed form ``sigma_rel_to_gamma`` inverts."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


# ----------------------------------------------------------------------------- the rules, closed forms
def run_average(cfg, values: torch.Tensor) -> list[torch.Tensor]:
    """Feed θ_1 … θ_t (rows of ``values``) to an AveragedModel of ``cfg``; its average after each step.
    The module starts at 1e6, so any weight of the initial value would show."""
    module = torch.nn.Linear(values.shape[1], 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(1e6)
    averaged = averaged_model(module, cfg)
    out = []
    for theta in values:
        with torch.no_grad():
            module.weight.copy_(theta[None])
        averaged.update_parameters(module)
        out.append(averaged.module.weight[0].detach().double().clone())
    return out


def test_edm2_sigma_rel_and_gamma():
    # EDM2 sec. 3.1: σ_rel 0.05 and 0.10 are γ = 16.97 and 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-10)
    assert gamma_to_sigma_rel(0.0) == pytest.approx(MAX_SIGMA_REL)
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(0.3)


def test_power_ema_is_the_closed_form_weighted_average_from_the_first_step():
    sigma_rel = 0.1
    g = sigma_rel_to_gamma(sigma_rel)
    values = torch.randn(40, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    averages = run_average(PowerEMA(sigma_rel=sigma_rel), values)
    assert torch.equal(averages[0], values[0].double())  # the first step copies: no warm-up, no initial weights
    for t in (2, 3, 10, 40):
        i = torch.arange(1, t + 1, dtype=torch.float64)
        w = (i ** (g + 1) - (i - 1) ** (g + 1)) / t ** (g + 1)  # θ_i's weight: the telescoping product of β's
        assert torch.allclose(averages[t - 1], w @ values[:t].double(), rtol=1e-5, atol=1e-6), t
        assert torch.allclose(power_profile(t, g, t), w)


def test_power_profile_has_the_width_it_is_named_for():
    # EDM2 eq. 121-123: the profile's standard deviation over its length is σ_rel (for many steps)
    t = 20000
    x = torch.arange(1, t + 1, dtype=torch.float64) - 0.5
    for s in (0.05, 0.1, 0.2):
        p = power_profile(t, sigma_rel_to_gamma(s), t)
        mean = p @ x
        assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
        assert math.sqrt(p @ (x - mean) ** 2) / t == pytest.approx(s, rel=1e-3)


def test_warmup_ema_is_diffusers_ramp():
    diffusers = pytest.importorskip("diffusers.training_utils")
    cfg = WarmupEMA(decay=0.999, inv_gamma=3.0, power=0.75)
    ref = diffusers.EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.999, use_ema_warmup=True, inv_gamma=3.0,
                             power=0.75)
    for step in range(1, 3000, 7):  # diffusers' step-th update follows step - 1 earlier ones
        assert decay(cfg, torch.tensor(step - 1)).item() == pytest.approx(ref.get_decay(step), abs=1e-12), step


def test_warmup_ema_closed_form():
    # inv_gamma = power = 1: β_n = (n-1)/n, the running mean, until it reaches decay; then a fixed EMA
    d = 0.9
    values = torch.randn(30, 2, generator=torch.Generator().manual_seed(1))
    averages = run_average(WarmupEMA(decay=d, inv_gamma=1.0, power=1.0), values)
    v = values.double()
    assert torch.allclose(averages[9], v[:10].mean(0), atol=1e-6)  # β_10 = 0.9 = decay
    t = 30
    expected = d ** (t - 10) * v[:10].mean(0) + sum((1 - d) * d ** (t - i) * v[i - 1] for i in range(11, t + 1))
    assert torch.allclose(averages[-1], expected, atol=1e-6)


def test_fixed_ema_closed_form():
    d = 0.95
    values = torch.randn(25, 2, generator=torch.Generator().manual_seed(2))
    averages = run_average(FixedEMA(decay=d), values)
    v, t = values.double(), 25
    expected = d ** (t - 1) * v[0] + sum((1 - d) * d ** (t - i) * v[i - 1] for i in range(2, t + 1))
    assert torch.allclose(averages[-1], expected, atol=1e-6)


def test_ema_config_checks():
    with pytest.raises(ValueError, match="sigma_rel"):
        PowerEMA(sigma_rel=0.0)
    with pytest.raises(ValueError, match="decay"):
        FixedEMA(decay=1.5)
    with pytest.raises(ValueError, match="inv_gamma"):
        WarmupEMA(inv_gamma=0.0)
    with pytest.raises(TypeError):
        PowerEMA(0.1)  # keyword only: the first field is the kind
    with pytest.raises(ValueError, match=f"more than {MAX_SNAPSHOTS}"):
        check_schedule(1000, 10, [0.05, 0.1])
    check_schedule(1000, 10, [])  # no profiles: nothing is snapshotted
    assert snapshot_steps(10, 4) == [4, 8, 10] and snapshot_steps(10, 0) == []


# ----------------------------------------------------------------------------- post-hoc least squares
def test_least_squares_weights_sum_to_one_and_reproduce_an_input_profile():
    steps = list(range(50, 601, 50))
    gammas = [sigma_rel_to_gamma(0.05)] * len(steps) + [sigma_rel_to_gamma(0.10)] * len(steps)
    for target in (0.03, 0.07, 0.15, 0.2):  # inside and somewhat outside the tracked 0.05-0.10
        x, error = solve_coefficients(steps * 2, gammas, 600, sigma_rel_to_gamma(target))
        assert x.sum().item() == pytest.approx(1.0, abs=1e-12)
        # the unscaled solution sums to 1 already when the fit is good: EDM2's scaling only tidies
        ls = torch.linalg.lstsq(*_normal_equations(steps * 2, gammas, 600, sigma_rel_to_gamma(target))).solution
        assert ls.sum().item() == pytest.approx(1.0, abs=0.05), target
        assert error < 0.1, target
    # a profile that was snapshotted at the last step is that snapshot, exactly
    x, error = solve_coefficients(steps * 2, gammas, 600, sigma_rel_to_gamma(0.10))
    assert error < 1e-6 and x[-1].item() == pytest.approx(1.0, abs=1e-6)


def _normal_equations(steps, gammas, out_step, out_gamma):
    P = torch.stack([power_profile(s, g, out_step) for s, g in zip(steps, gammas)])
    target = power_profile(out_step, out_gamma, out_step)
    return P @ P.T, (P @ target)[:, None]


def test_gram_matrix_matches_edm2_closed_form():
    # EDM2 eq. 151 (Algorithm 3's inner products of continuous profiles), for many steps
    ga, gb, ta, tb = sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.1), 12000, 20000
    edm2 = (ga + 1) * (gb + 1) * (ta / tb) ** gb / ((ga + gb + 1) * tb)  # ta < tb
    assert (power_profile(ta, ga, tb) @ power_profile(tb, gb, tb)).item() == pytest.approx(edm2, rel=1e-4)


def tiny_spec() -> ModelSpec:
    return ModelSpec(unet=UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0),
                     image_size=8, timesteps=100)


def test_posthoc_reconstructs_a_directly_tracked_power_ema():
    """Track σ_rel 0.07 directly while snapshotting only 0.05 and 0.10; reconstruct 0.07."""
    spec = tiny_spec()
    images, _ = synthetic_images(512, 0, size=8)
    torch.manual_seed(0)
    net = spec.build_unet()
    cfg = TrainConfig(steps=120, batch_size=16, lr=1e-3, warmup_steps=10, log_every=40,
                      ema=PowerEMA(sigma_rel=0.07), ema_profiles=[0.05, 0.10], ema_snapshot_every=10)
    state = init_state(net, cfg, 0, torch.device("cpu"))
    snaps = []
    train(state, spec.build_diffusion(), images, cfg,
          on_snapshot=lambda s: snaps.append((s.step, [snapshot(averaged_weights(p)) for p in s.profiles])))
    steps = [k for k, _ in snaps]
    assert steps == list(range(10, 121, 10))
    inputs = [w[j] for j in range(2) for _, w in snaps]  # profile by profile
    sigma_rels = [0.05] * len(steps) + [0.10] * len(steps)
    weights, x, error = posthoc_ema(inputs, steps * 2, sigma_rels, 120, 0.07)

    def dist(a, b):
        return math.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in a))

    tracked, raw = averaged_weights(state.ema), net.state_dict()
    nearest_profile = min(dist(averaged_weights(p), tracked) for p in state.profiles)
    # within 5% of how far the average is from the raw weights, and far closer than either input profile
    assert dist(weights, tracked) < 0.05 * dist(tracked, raw)
    assert dist(weights, tracked) < 0.2 * nearest_profile
    assert error < 0.02 and x.sum().item() == pytest.approx(1.0)
    # the solve from σ_rel is the solve from γ
    assert torch.equal(solve(steps * 2, sigma_rels, 120, 0.07)[0], x)


# ----------------------------------------------------------------------------- behaviour after training
def denoise_workspace(root, ema: dict):
    """8×8 bars (1024 train, 256 held-out test images), T = 100, 300 steps: ~10 s on one thread."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", 1024, 0), ("test", 256, 1)):
        images, labels = synthetic_images(n, seed, size=8)
        save_split(Split(images, labels.long(), CLASSES), root / f"data/prepared/{split}.pt")
    write_params(root, top={"timesteps": 100}, steps=300, batch_size=32, lr=1.0e-3, warmup_steps=20, log_every=50,
                 checkpoint_every=0, ema=ema, ema_snapshot_every=0)
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["denoise"].update(num_images=256, batch_size=256)
    (root / "params.yaml").write_text(yaml.safe_dump(p))
    for args in (("train", "--device", "cpu"), ("ema",), ("denoise", "--device", "cpu")):
        result = cli(root, *args)
        assert result.exit_code == 0, result.output
    d = json.loads((root / "metrics/denoise.json").read_text())["denoise"]
    return {k: d[f"{k}_mse"] for k in ("ema", "raw", "untrained")}


@pytest.fixture(scope="module")
def denoised(tmp_path_factory):
    """The same training run (seed, data, steps) with the default power EMA and with a fixed decay
    of 0.999, an averaging horizon of ~1000 steps, longer than the run (the stale EMA of issue 11)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("denoise")
    return {"power": denoise_workspace(root / "power", {"kind": "power", "sigma_rel": 0.10}),
            "fixed": denoise_workspace(root / "fixed", {"kind": "fixed", "decay": 0.999})}


@pytest.mark.slow
def test_short_training_beats_an_untrained_network(denoised):
    m = denoised["power"]
    assert m["untrained"] > 0.9  # an untrained ε-network outputs about 0: MSE ≈ E[ε²] = 1
    assert m["raw"] < 0.25 * m["untrained"] and m["ema"] < 0.25 * m["untrained"]


@pytest.mark.slow
def test_ema_denoises_held_out_images_as_well_as_the_raw_weights(denoised):
    m = denoised["power"]
    assert m["raw"] < 0.25 * m["untrained"]  # trained: this cannot pass on noise
    assert m["ema"] <= 1.02 * m["raw"], m


@pytest.mark.slow
def test_the_old_fixed_decay_fails_that_check_on_the_same_run(denoised):
    power, fixed = denoised["power"], denoised["fixed"]
    assert fixed["raw"] == power["raw"] and fixed["untrained"] == power["untrained"]  # the EMA does not change training
    assert fixed["ema"] > 1.02 * fixed["raw"]  # the check above catches the stale average
    assert fixed["ema"] > 2 * power["ema"]


# ----------------------------------------------------------------------------- the ema stage, sample.weights
def set_params(root, **groups):
    p = yaml.safe_load((root / "params.yaml").read_text())
    for group, values in groups.items():
        p[group].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(p))


def test_ema_stage_posthoc_and_sampling_weights(tmp_path):
    root = workspace(tmp_path, steps=6)  # power EMA σ_rel 0.10; profiles 0.05, 0.10 snapshotted at steps 2, 4, 6
    assert cli(root, "train", "--device", "cpu").exit_code == 0
    index = json.loads((root / "models/ema_snapshots/index.json").read_text())
    assert index["steps"] == [2, 4, 6] and index["sigma_rels"] == [0.05, 0.1] and index["dtype"] == "float16"

    assert cli(root, "ema").exit_code == 0  # ema.sigma_rel: null: train's own EMA, unchanged
    own, trained = load_checkpoint(root / "models/model_ema.pt"), load_checkpoint(root / "models/model.pt")
    assert all(torch.equal(own["ema"][k], trained["ema"][k]) for k in trained["ema"])
    assert own["ema_config"] == {"source": "train", "kind": "power", "sigma_rel": 0.1}
    assert json.loads((root / "metrics/ema.json").read_text())["average"]["source"] == "train"

    # post-hoc σ_rel 0.10, which train also tracked directly (train.ema): the same weights up to float16
    set_params(root, ema={"sigma_rel": 0.1})
    result = cli(root, "ema")
    assert result.exit_code == 0, result.output
    posthoc = load_checkpoint(root / "models/model_ema.pt")
    assert posthoc["ema_config"]["source"] == "posthoc" and posthoc["ema_config"]["fit_error"] < 1e-6
    for k, v in trained["ema"].items():
        if k.startswith("module."):
            assert torch.allclose(posthoc["ema"][k], v, rtol=1e-3, atol=1e-4), k
    assert all(torch.equal(posthoc["model"][k], v) for k, v in trained["model"].items())  # raw weights kept

    images = {}
    for weights in ("ema", "raw"):
        set_params(root, sample={"weights": weights})
        assert cli(root, "sample", "--sampler", "ddim", "--steps", "2", "--out", f"s-{weights}",
                   "--device", "cpu").exit_code == 0
        info = json.loads((root / f"s-{weights}/info.json").read_text())
        assert info["weights"] == weights and info["ema"]["source"] == "posthoc"
        images[weights] = torch.load(root / f"s-{weights}/samples.pt", weights_only=True)["images"]
    assert not torch.equal(images["ema"], images["raw"])


def test_ema_stage_refuses_foreign_or_corrupt_snapshots(tmp_path):
    root = workspace(tmp_path, steps=4)
    assert cli(root, "train", "--device", "cpu").exit_code == 0
    set_params(root, ema={"sigma_rel": 0.07})
    index_file = root / "models/ema_snapshots/index.json"
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps({**index, "fingerprint": "another run"}))
    result = cli(root, "ema")
    assert result.exit_code == 1 and errors(result) == [
        "error: the EMA snapshots in models/ema_snapshots are from another training run than models/model.pt"]
    index_file.write_text(json.dumps(index))
    (root / "models/ema_snapshots/step-0000004.pt").write_bytes(b"truncated")
    result = cli(root, "ema")
    assert result.exit_code == 1 and len(errors(result)) == 1
    assert "EMA snapshot models/ema_snapshots/step-0000004.pt is corrupt" in errors(result)[0]
    assert not (root / "models/model_ema.pt").exists()


def test_fid_against_sigma_rel_across_experiments(tmp_path):
    from pipeline.experiments import ema_sweep
    from pipeline.experiments.compare import _revisions

    def rev(name, ema, fid, weights="ema"):
        return {"rev": name * 40 if len(name) == 1 else name, "name": name, "data": {
            "params": {"params.yaml": {"data": {"sample": {"weights": weights}}}},
            "metrics": {"metrics/fid.json": {"data": {"fid": {"ddpm": {"10": fid, "20": fid - 1},
                                                               "ddim": {"10": fid + 5, "20": fid + 4}}}},
                        "metrics/ema.json": {"data": {"average": ema}}}}}

    head = rev("a", {"source": "train", "kind": "fixed", "decay": 0.995}, 90.0)
    head["experiments"] = [{"name": n, "revs": [rev(n, {"source": "posthoc", "kind": "power", "sigma_rel": s}, f)]}
                           for n, s, f in (("s20", 0.2, 60.0), ("s05", 0.05, 50.0), ("s10", 0.1, 40.0))]
    head["experiments"].append({"name": "raw", "revs": [rev("raw", {"source": "train", "kind": "fixed",
                                                                     "decay": 0.995}, 45.0, weights="raw")]})
    points, references = ema_sweep.sweep(_revisions([head]))
    assert [p["sigma_rel"] for p in points] == [0.05, 0.1, 0.2]
    assert [r["label"] for r in references] == ["fixed EMA 0.995", "raw weights"]
    text = ema_sweep.render(points, references, None)
    assert "(20 sampling steps" in text and "| 0.1 (posthoc) | s10 | **39.000** | **44.000** |" in text
    assert "| fixed EMA 0.995 | a | 89.000 | 94.000 |" in text
    ema_sweep.plot(points, references, 10, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no FID at 50 steps"):
        ema_sweep.render(points, references, 50)
