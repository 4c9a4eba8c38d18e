"""Samplers checked without training: for Gaussian data the optimal ε-predictor is
known in closed form, so sampled statistics must match the data's."""

import pytest
import torch
from gaussian import gaussian_model

from ddpm.diffusion import Diffusion, respace, timestep_subsequence
from ddpm.predictions import Prediction
from ddpm.samplers import ddim_step, ddpm_step, sample

MU = torch.tensor([0.5, -0.3])
STD = torch.tensor([0.2, 0.4])


@pytest.fixture(scope="module")
def d():
    return Diffusion.from_schedule("linear", 1000, dtype=torch.float64)


def run(d, sampler, steps, n=20000, seed=0, **options):
    g = torch.Generator().manual_seed(seed)
    return sample(gaussian_model(d, MU, STD), d, (n, 2), sampler=sampler, steps=steps, clip="none", generator=g,
                  options=options).float()


def exact_moments(d: Diffusion, sampler: str, steps: int, eta: float = 0.0, variance: str = "fixed_small"):
    """Mean and std of the sampler's output, propagated exactly.

    With the optimal Gaussian denoiser every step is affine in x plus independent noise,
    x' = P x + Q + σ z, so the per-dimension moments follow m' = P m + Q, v' = P² v + σ².
    Written in scalar form from the papers' equations, independently of ddpm.samplers.
    """
    r = respace(d, timestep_subsequence(d.num_timesteps, steps))
    m, v = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    s2, mu = STD.double() ** 2, MU.double()
    for i in reversed(range(steps)):
        a, a_prev, beta = r.alphas_cumprod[i], r.alphas_cumprod_prev[i], r.betas[i]
        c = (1 - a).sqrt() / (a * s2 + 1 - a)                 # ε̂ = c (x - sqrt(a) μ)
        e_P, e_Q = c, -c * a.sqrt() * mu
        x0_P, x0_Q = (1 - (1 - a).sqrt() * e_P) / a.sqrt(), -(1 - a).sqrt() * e_Q / a.sqrt()
        if sampler == "ddpm":                                 # x' = μ̃(x, x̂0) + σ z
            c1 = a_prev.sqrt() * beta / (1 - a)
            c2 = (1 - beta).sqrt() * (1 - a_prev) / (1 - a)
            P, Q = c1 * x0_P + c2, c1 * x0_Q
            var = (1 - a_prev) / (1 - a) * beta if variance == "fixed_small" else beta  # β̃ or β
            sigma2 = var if i > 0 else 0.0                    # the last step adds no noise
        else:                                                 # DDIM, eq. 12
            sigma2 = (eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)) if i > 0 else 0.0
            k = (1 - a_prev - sigma2).sqrt()
            P, Q = a_prev.sqrt() * x0_P + k * e_P, a_prev.sqrt() * x0_Q + k * e_Q
        m, v = P * m + Q, P**2 * v + sigma2
    return m.float(), v.sqrt().float()


@pytest.mark.parametrize("sampler,steps,options", [
    ("ddpm", 10, {"variance": "fixed_small"}),
    ("ddpm", 50, {"variance": "fixed_small"}),
    ("ddpm", 50, {"variance": "fixed_large"}),
    ("ddim", 10, {"eta": 0.0}),
    ("ddim", 50, {"eta": 0.0}),
    ("ddim", 50, {"eta": 0.5}),
    ("ddim", 50, {"eta": 1.0}),
])
def test_sampler_moments_match_exact_propagation(d, sampler, steps, options):
    """Monte Carlo moments of the sampler equal the exactly propagated ones (to MC error)."""
    x = run(d, sampler, steps, **options)
    mean, std = exact_moments(d, sampler, steps, **options)
    assert torch.allclose(x.mean(0), mean, atol=0.01)
    assert torch.allclose(x.std(0), std, rtol=0.025)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samples_approach_data_as_steps_grow(d, sampler):
    errs = [float((exact_moments(d, sampler, s)[1] - STD).abs().max()) for s in (10, 50, 200, 1000)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.005
    x = run(d, sampler, 1000, n=20000)
    assert torch.allclose(x.mean(0), MU, atol=0.015) and torch.allclose(x.std(0), STD, rtol=0.03)


def test_fixed_large_overdisperses_at_few_steps(d):
    """σ² = β is larger than the true posterior variance β̃: with few steps samples spread more."""
    small = run(d, "ddpm", 20, variance="fixed_small").std(0)
    large = run(d, "ddpm", 20, variance="fixed_large").std(0)
    assert torch.all(large > small)


def test_ddim_eta0_deterministic_and_seeded(d):
    a, b = run(d, "ddim", 20, n=64, seed=3, eta=0.0), run(d, "ddim", 20, n=64, seed=3, eta=0.0)
    assert torch.equal(a, b)
    c, e = run(d, "ddpm", 20, n=64, seed=3), run(d, "ddpm", 20, n=64, seed=3)
    assert torch.equal(c, e)
    assert not torch.equal(c, run(d, "ddpm", 20, n=64, seed=4))


def test_ddpm_step_noise_scale_is_sqrt_posterior_variance(d):
    """σ_t = sqrt(β̃_t), not β̃_t: the spread of x_{t-1} given (x_t, x̂_0) is the posterior variance."""
    r = respace(d, timestep_subsequence(1000, 10))
    n, i = 200_000, 5
    x = torch.zeros(n, 1, dtype=torch.float64)
    pred = Prediction(x0=torch.full_like(x, 0.4), eps=torch.zeros_like(x))
    g = torch.Generator().manual_seed(0)
    out = ddpm_step(x, i, pred, r, {}, g, variance="fixed_small")
    assert out.var().item() == pytest.approx(r.posterior_variance[i].item(), rel=0.02)
    assert out.mean().item() == pytest.approx((r.posterior_mean_coef1[i] * 0.4).item(), abs=2e-3)
    # the last step returns the mean, no noise
    assert torch.equal(ddpm_step(x, 0, pred, r, {}, g), r.posterior_mean_coef1[0] * pred.x0)


def test_ddim_step_eta1_matches_ddpm_variance(d):
    """η = 1 gives σ_t² = β̃_t (Song et al. 2021, below eq. 16)."""
    r = respace(d, timestep_subsequence(1000, 10))
    i, n = 4, 200_000
    x = torch.zeros(n, 1, dtype=torch.float64)
    pred = Prediction(x0=torch.zeros_like(x), eps=torch.zeros_like(x))
    out = ddim_step(x, i, pred, r, {}, torch.Generator().manual_seed(0), eta=1.0)
    assert out.var().item() == pytest.approx(r.posterior_variance[i].item(), rel=0.02)


def test_unknown_sampler(d):
    with pytest.raises(ValueError, match="ddpm, ddim"):
        sample(gaussian_model(d, MU, STD), d, (2, 2), sampler="euler_maruyama")
