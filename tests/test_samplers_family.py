"""The sampler family checked without training.

For Gaussian data, and for a two-component Gaussian mixture, the optimal ε-predictor
E[ε | x_t] is known in closed form. Fed to every sampler as the "model", it must make
the samples' mean and covariance match the data's, more closely as steps grow. The
deterministic samplers are affine maps of x_T for Gaussian data, so their output
distribution is computed exactly by pushing x_T = 0 and x_T = 1 through them.
"""

import math

import pytest
import torch
from gaussian import MU, STD, M, gaussian_model, mixture_model, mixture_moments

from ddpm.diffusion import Diffusion
from ddpm.predictions import clip_x0
from ddpm.samplers import SAMPLERS, ddim_invert, sample

pytestmark = pytest.mark.usefixtures("one_thread")

# every sampler with the options that change its maths
FAMILY = [("ddpm", {"variance": "fixed_small"}), ("ddpm", {"variance": "fixed_large"}), ("ddim", {"eta": 0.0}),
          ("ddim", {"eta": 1.0}), ("ddim", {"variance": "sigma_hat"}), ("dpm_solver++", {}), ("euler", {}),
          ("heun", {})]
FAMILY_IDS = [s + "".join(f"-{v}" for v in o.values()) for s, o in FAMILY]
DETERMINISTIC = ["ddim", "dpm_solver++", "euler", "heun"]


@pytest.fixture(scope="module")
def d():
    return Diffusion.from_schedule("linear", 1000, dtype=torch.float64)


def draw(model, d, sampler, steps, options, n=20000, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return sample(model, d, (n, 2), sampler=sampler, steps=steps, clip="none", generator=g, options=options, **kw)


def exact_output(d, sampler, steps, spacing="linspace", **options):
    """Mean and std of a deterministic sampler's output for x_T ~ N(0, I), exactly: for Gaussian
    data each step is affine and per-dimension, x_0 = A x_T + B, so B = f(0), A = f(1) - f(0)."""
    x_T = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    y = sample(gaussian_model(d), d, (2, 2), sampler=sampler, steps=steps, spacing=spacing, clip="none",
               x_T=x_T, options=options)
    return y[0], (y[1] - y[0]).abs()


def w2(m1, s1, m2, s2) -> float:
    """2-Wasserstein distance between Gaussians with diagonal covariances."""
    return float(((m1 - m2) ** 2 + (s1 - s2) ** 2).sum().sqrt())



def tolerance(steps: int) -> float:
    """Discretisation error ~ 1/steps, plus the Monte Carlo error of 10 000 samples."""
    return 2.5 / steps + 0.02


# ---------------------------------------------------------------- every sampler against the data
@pytest.mark.parametrize("sampler,options", FAMILY, ids=FAMILY_IDS)
def test_moments_match_data_within_shrinking_tolerance(d, sampler, options):
    mix_mean, mix_cov = mixture_moments()
    errors = []
    for steps in (10, 40, 160):
        x = draw(gaussian_model(d), d, sampler, steps, options, n=10000)
        err_g = max(float((x.mean(0) - MU).abs().max()), float((x.std(0) - STD).abs().max()))
        y = draw(mixture_model(d), d, sampler, steps, options, n=10000)
        err_m = max(float((y.mean(0) - mix_mean).abs().max()), float((torch.cov(y.T) - mix_cov).abs().max()))
        assert err_g < tolerance(steps) and err_m < tolerance(steps), (steps, err_g, err_m)
        errors.append(max(err_g, err_m))
    assert errors[-1] < errors[0] / 3, errors
    # the mixture's weights come out right too: 30 % of the samples nearer the first mean
    near_first = ((y - M[0]).norm(dim=1) < (y - M[1]).norm(dim=1)).double().mean()
    assert abs(float(near_first) - 0.3) < 0.02


def test_dpm_solver_pp_beats_ddim_at_20_steps(d):
    """Exact output distributions for Gaussian data: 2-Wasserstein distance to the data."""
    w_ddim = w2(*exact_output(d, "ddim", 20), MU, STD)
    w_dpm = w2(*exact_output(d, "dpm_solver++", 20), MU, STD)
    assert w_dpm < 0.75 * w_ddim, (w_dpm, w_ddim)          # measured: 0.059 vs 0.088
    # and on the mixture (same x_T for both): the covariance error
    mix_mean, mix_cov = mixture_moments()
    cov_err = {s: float((torch.cov(draw(mixture_model(d), d, s, 20, {}, n=10000).T) - mix_cov).abs().max())
               for s in ("ddim", "dpm_solver++")}
    assert cov_err["dpm_solver++"] < 0.5 * cov_err["ddim"], cov_err  # measured: 0.011 vs 0.044


@pytest.mark.parametrize("sampler,order", [("ddim", 1), ("euler", 1), ("dpm_solver++", 2), ("heun", 2)])
def test_convergence_order_to_the_exact_ode_solution(d, sampler, order):
    """The probability-flow ODE maps x_T to μ + s (x_T - sqrt(ᾱ_T) μ) / sqrt(ᾱ_T s² + 1 - ᾱ_T);
    doubling the steps halves a first-order solver's error and quarters a second-order one's."""
    a_T = d.alphas_cumprod[-1]
    v = a_T * STD**2 + 1 - a_T
    A, B = STD / v.sqrt(), MU - STD * a_T.sqrt() * MU / v.sqrt()
    errs = []
    for steps in (25, 50, 100):
        mean, std = exact_output(d, sampler, steps)
        errs.append(float((std - A).abs().max() + (mean - B).abs().max()))
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    if order == 1:
        assert all(1.7 < r < 2.5 for r in ratios), ratios
    else:
        assert all(r > 3.2 for r in ratios), ratios


def test_euler_is_ddim_eta0_and_sigma_hat_is_ddpm_fixed_large(d):
    for steps in (7, 30):
        assert torch.allclose(torch.stack(exact_output(d, "euler", steps)),
                              torch.stack(exact_output(d, "ddim", steps)), atol=1e-12)
    a = draw(gaussian_model(d), d, "ddim", 20, {"variance": "sigma_hat"}, n=64, seed=5)
    b = draw(gaussian_model(d), d, "ddpm", 20, {"variance": "fixed_large"}, n=64, seed=5)
    assert torch.equal(a, b)


def test_heun_costs_two_evaluations_per_step_but_the_first_and_last(d):
    calls = []
    model = gaussian_model(d)
    for sampler in SAMPLERS:
        calls.clear()
        sample(lambda x, t: calls.append(1) or model(x, t), d, (4, 2), sampler=sampler, steps=10)
        assert len(calls) == (18 if sampler == "heun" else 10), sampler


def test_heun_is_stable_on_the_cosine_schedule():
    """ᾱ_T ≈ 0 under the cosine schedule (σ_T ≈ 2·10⁴): Heun must still land on the data."""
    d = Diffusion.from_schedule("cosine", 1000, dtype=torch.float64)
    for steps in (10, 20):
        x = draw(gaussian_model(d), d, "heun", steps, {}, n=20000)
        assert torch.allclose(x.mean(0).double(), MU, atol=0.03) and torch.all((x.std(0).double() - STD).abs() < 0.1), steps


# ---------------------------------------------------------------- determinism and seeds
@pytest.mark.parametrize("sampler,options", FAMILY, ids=FAMILY_IDS)
def test_same_seed_same_samples(d, sampler, options):
    a, b = (draw(gaussian_model(d), d, sampler, 12, options, n=64, seed=3) for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, draw(gaussian_model(d), d, sampler, 12, options, n=64, seed=4))
    # given x_T, only the stochastic samplers still depend on the generator
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c, e = (draw(gaussian_model(d), d, sampler, 12, options, n=64, seed=s, x_T=x_T) for s in (5, 6))
    deterministic = sampler in DETERMINISTIC and options.get("eta", 0) == 0 and "variance" not in options
    assert torch.equal(c, e) == deterministic


def test_ddim_inversion_round_trip(d):
    x0 = MU + STD * torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for steps in (50, 200, 1000):
        x_T = ddim_invert(gaussian_model(d), d, x0, steps)
        x0_again = sample(gaussian_model(d), d, x0.shape, sampler="ddim", steps=steps, clip="none", x_T=x_T)
        errors.append(float((x0_again - x0).abs().mean()))
    # first order in the step size (ε̂ is taken one step behind); measured 0.038, 0.010, 0.002
    assert errors[0] > 3 * errors[1] > 9 * errors[2] and errors[2] < 0.004, errors
    assert float((x0_again - x0).abs().max()) < 0.02
    # the inverted data is the prior: x_T ~ N(0, I)
    assert torch.allclose(x_T.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.08)
    assert torch.allclose(x_T.std(0), torch.ones(2, dtype=torch.float64), atol=0.04)


# ---------------------------------------------------------------- clipping, precision, validation
def nearest_rank_threshold(x, p):
    """Imagen's dynamic threshold written out row by row, independently of ddpm.predictions."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        values = x[b].abs().flatten().sort().values
        s = max(1.0, float(values[math.ceil(p / 100 * values.numel()) - 1]))
        out[b] = x[b].clamp(-s, s) / s
    return out


@pytest.mark.parametrize("p", [99.5, 90.0, 100.0])
def test_dynamic_thresholding_per_sample(p):
    x = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.2, 1, 2, 3, 9])[:, None, None, None]
    out = clip_x0(x, "dynamic", p)
    assert torch.allclose(out, nearest_rank_threshold(x, p))
    assert out.abs().max() <= 1
    assert torch.equal(out[0], x[0])          # a sample inside [-1, 1] is left alone (s = max(1, ·) = 1)
    assert torch.equal(clip_x0(x, "static", p), x.clamp(-1, 1)) and torch.equal(clip_x0(x, "none", p), x)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_dynamic_thresholding_keeps_out_of_range_data_from_saturating(d, sampler):
    """Data at 2.5 ± 0.3, far outside [-1, 1]: static clipping pins the values near 1, dynamic
    thresholding (95th percentile) rescales instead, so the samples keep their spread."""
    model = gaussian_model(d, torch.full((64,), 2.5, dtype=torch.float64), torch.full((64,), 0.3, dtype=torch.float64))

    def run(clip):
        return sample(model, d, (32, 64), sampler=sampler, steps=10, clip=clip, percentile=95.0,
                      generator=torch.Generator().manual_seed(0))

    static, dynamic = run("static"), run("dynamic")
    assert (static >= 0.95).double().mean() > 0.6                 # measured: 1.0 (Heun: 0.67)
    assert dynamic.abs().max() <= 1 + 1e-6
    assert (dynamic.abs() >= 1 - 1e-6).double().mean() < 0.07    # only the top 5 % (rounded up) reach 1
    assert dynamic.std(1).mean() > max(0.05, static.std(1).mean())  # measured: 0.07-0.22 against 0.005-0.10


def test_no_host_synchronisation_in_the_loop(d, monkeypatch):
    """Reading a tensor's value on the host (.item(), bool(), float(), .tolist()) inside the step
    loop would synchronise with the GPU; on the CPU, make each of them fail once the model runs."""
    armed = []

    def refuse(name):
        original = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            if armed:
                raise AssertionError(f"Tensor.{name} called inside the sampling loop")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, method)

    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        refuse(name)
    model = gaussian_model(d)

    def armed_model(x, t):
        armed.append(1)
        return model(x, t)

    for sampler, options in FAMILY:
        for clip in ("static", "dynamic"):
            armed.clear()
            sample(armed_model, d, (8, 2), sampler=sampler, steps=5, clip=clip, options=options,
                   generator=torch.Generator().manual_seed(0))
    armed.clear()
    ddim_invert(armed_model, d, torch.zeros(8, 2, dtype=torch.float64), 5)
    armed.clear()


@pytest.mark.parametrize("kwargs,message", [
    ({"sampler": "ddim", "options": {"etta": 0.1}}, "no option 'etta' .*eta, variance"),
    ({"sampler": "ddpm", "options": {"variance": "wide"}}, "fixed_small, fixed_large"),
    ({"sampler": "ddim", "options": {"variance": "big"}}, "eta, sigma_hat"),
    ({"sampler": "dpm_solver++", "options": {"order": 3}}, "no option 'order'.*none"),
    ({"sampler": "unipc"}, "ddpm, ddim, dpm_solver\\+\\+, euler, heun"),
    ({"clip": "soft"}, "static, dynamic, none"),
    ({"clip": "dynamic", "percentile": 0.995}, "percentile"),
    ({"precision": "fp16"}, "auto, fp32, bf16"),
    ({"prediction": "score"}, "eps, x0, v, mean"),
])
def test_bad_input_fails_before_the_model_runs(d, kwargs, message):
    def model(x, t):
        raise AssertionError("the model ran")

    with pytest.raises(ValueError, match=message):
        sample(model, d, (2, 2), steps=5, **kwargs)


def test_sigma_hat_has_no_eta(d):
    with pytest.raises(ValueError, match="eta"):
        draw(gaussian_model(d), d, "ddim", 5, {"variance": "sigma_hat", "eta": 0.5}, n=2)


# ---------------------------------------------------------------- the sample matrix in params.yaml
def test_params_name_every_sampler_kind_and_reject_bad_options():
    from pathlib import Path

    import yaml

    from pipeline.params.base import ParamsError
    from pipeline.params.schema import load_params, parse_params

    path = Path(__file__).resolve().parents[1] / "params.yaml"
    p = load_params(path)
    assert {p.samplers[name].kind for name in p.sample.samplers} == set(SAMPLERS)
    for change, message in [
        (lambda r: r["samplers"]["dpmpp"].update(order=3), r"samplers\.dpmpp.*order: unknown key"),
        (lambda r: r["samplers"]["dpmpp"].update(kind="unipc"), "'ddpm', 'ddim', 'dpm_solver\\+\\+', 'euler', 'heun'"),
        (lambda r: r["samplers"]["ddim"].update(variance="sigma_hat", eta=0.5), r"samplers\.ddim.*eta applies"),
        (lambda r: r["sample"].update(clip="soft"), r"sample\.clip: .*'static', 'dynamic' or 'none'"),
        (lambda r: r["sample"].update(precision="fp16"), r"sample\.precision: .*'auto', 'fp32' or 'bf16'"),
        (lambda r: r["sample"].update(clip_percentile=0.995), r"sample\.clip_percentile"),
    ]:
        raw = yaml.safe_load(path.read_text())
        change(raw)
        with pytest.raises(ParamsError, match=message):
            parse_params(raw)
