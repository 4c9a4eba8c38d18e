import pytest
import torch

from ddpm.diffusion import (Diffusion, eps_from_x0, q_posterior_mean_variance, q_sample, respace,
                            timestep_subsequence, v_from_x0_eps, x0_from_eps, x0_from_posterior_mean, x0_from_v)
from ddpm.predictions import PREDICTIONS, to_prediction, training_target
from ddpm.schedules import make_betas


@pytest.fixture(params=["linear", "cosine"])
def d64(request):
    return Diffusion.from_schedule(request.param, 1000, dtype=torch.float64)


def test_q_sample_moments(d64):
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 0.7, dtype=torch.float64)
    for t in (0, 10, 500, 999):
        tt = torch.full((x0.shape[0],), t)
        xt = q_sample(d64, x0, tt, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        ac = d64.alphas_cumprod[t].item()
        assert xt.mean().item() == pytest.approx(ac**0.5 * 0.7, abs=5e-3)
        assert xt.var().item() == pytest.approx(1 - ac, rel=2e-2, abs=1e-4)


def test_posterior_matches_bayes(d64):
    """μ̃ and β̃ equal the product of q(x_{t-1}|x_0) and q(x_t|x_{t-1}), derived independently."""
    ac = torch.cumprod(1 - d64.betas64, 0)
    x0, xt = torch.tensor([[0.3], [-0.8]], dtype=torch.float64), torch.tensor([[1.1], [0.2]], dtype=torch.float64)
    for t in (1, 5, 300, 999):  # index t ↔ paper t+1; needs t ≥ 1 for a proper prior on x_{t-1}
        beta, ac_prev = d64.betas64[t], ac[t - 1]
        prec = 1 / (1 - ac_prev) + (1 - beta) / beta
        var = 1 / prec
        mean = var * (ac_prev.sqrt() * x0 / (1 - ac_prev) + (1 - beta).sqrt() * xt / beta)
        m, v, logv = q_posterior_mean_variance(d64, x0, xt, torch.full((2,), t))
        torch.testing.assert_close(m, mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(v, torch.full_like(v, var.item()), rtol=1e-9, atol=0)
        torch.testing.assert_close(logv.exp(), v, rtol=1e-9, atol=0)
    # the coefficient of x_0 is sqrt(ᾱ_{t-1}) β_t / (1 - ᾱ_t)
    t = 400
    assert d64.posterior_mean_coef1[t].item() == pytest.approx(
        (ac[t - 1].sqrt() * d64.betas64[t] / (1 - ac[t])).item(), rel=1e-12)


def test_conversions_round_trip(d64):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(64, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (64,), generator=g)
    xt = q_sample(d64, x0, t, eps)
    torch.testing.assert_close(x0_from_eps(d64, xt, t, eps), x0)
    torch.testing.assert_close(eps_from_x0(d64, xt, t, x0), eps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x0_from_v(d64, xt, t, v_from_x0_eps(d64, x0, t, eps)), x0)
    mean = q_posterior_mean_variance(d64, x0, xt, t)[0]
    torch.testing.assert_close(x0_from_posterior_mean(d64, xt, t, mean), x0, rtol=1e-6, atol=1e-6)
    # every parameterisation's target, fed back through the conversion layer, recovers (x_0, ε)
    for prediction in PREDICTIONS:
        out = training_target(d64, prediction, x0, xt, t, eps)
        pred = to_prediction(d64, prediction, out, xt, t)
        torch.testing.assert_close(pred.x0, x0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(pred.eps, eps, rtol=1e-5, atol=1e-5)


def test_tables_cast_once_from_float64():
    d = Diffusion.from_schedule("linear", 1000)
    assert d.alphas_cumprod.dtype == torch.float32 and d.betas64.dtype == torch.float64
    ac64 = torch.cumprod(1 - make_betas("linear", 1000), 0)
    assert torch.equal(d.alphas_cumprod, ac64.float())


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", "quadratic"])
def test_timestep_subsequence(spacing):
    for steps in (1, 10, 50, 1000):
        ts = timestep_subsequence(1000, steps, spacing)
        assert len(ts) == steps and ts == sorted(set(ts)) and 0 <= ts[0] and ts[-1] <= 999
    assert timestep_subsequence(1000, 1000, spacing) == list(range(1000))


def test_spacing_conventions():
    assert timestep_subsequence(1000, 10, "linspace")[[0, -1][0]] == 0
    assert timestep_subsequence(1000, 10, "linspace")[-1] == 999
    assert timestep_subsequence(1000, 10, "leading") == list(range(0, 1000, 100))
    assert timestep_subsequence(1000, 10, "trailing") == list(range(99, 1000, 100))


def test_respacing_preserves_marginals(d64):
    ts = timestep_subsequence(1000, 25, "linspace")
    r = respace(d64, ts)
    torch.testing.assert_close(r.alphas_cumprod, d64.alphas_cumprod[ts], rtol=1e-9, atol=0)
    assert r.num_timesteps == 25
    # full respacing is the identity
    torch.testing.assert_close(respace(d64, list(range(1000))).betas, d64.betas, rtol=1e-10, atol=0)
