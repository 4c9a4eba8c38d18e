"""The ablation space's math: parameterisation round trips, Gaussian KL, the discretised
decoder, the bound's terms at their analytic minimum for Gaussian data, learned variance,
the training objectives and importance sampling of t."""

import math
from itertools import product

import pytest
import torch

from ddpm.diffusion import Diffusion, q_sample, respace, timestep_subsequence
from ddpm.likelihood import discretized_gaussian_log_likelihood, normal_kl, nll_bits_per_dim, prior_kl, vlb_terms
from ddpm.model import ModelSpec
from ddpm.objectives import check_objective, training_terms
from ddpm.predictions import PREDICTIONS, Prediction, to_prediction, training_target
from ddpm.samplers import sample
from ddpm.timestep_sampling import ImportanceSampler, UniformSampler, make_timestep_sampler
from ddpm.variance import fixed_log_variance_table, learned_log_variance

pytestmark = pytest.mark.usefixtures("one_thread")

MU = torch.tensor([0.5, -0.3], dtype=torch.float64)
STD = torch.tensor([0.2, 0.4], dtype=torch.float64)


@pytest.fixture(scope="module")
def d():
    return Diffusion.from_schedule("linear", 1000, dtype=torch.float64)


# ------------------------------------------------------------------ parameterisations
@pytest.mark.parametrize("source,target", list(product(PREDICTIONS, PREDICTIONS)))
def test_round_trip_between_parameterisations(d, source, target):
    """The exact target of ``source`` → (x̂0, ε̂) → ``target`` gives the exact target of ``target``."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(64, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 100, 500, 900, 998, 999] * 8)
    xt = q_sample(d, x0, t, noise)
    out = training_target(d, source, x0, xt, t, noise)
    pred = to_prediction(d, source, out, xt, t)
    torch.testing.assert_close(pred.x0, x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pred.eps, noise, rtol=1e-6, atol=1e-6)
    back = training_target(d, target, pred.x0, xt, t, pred.eps)
    torch.testing.assert_close(back, training_target(d, target, x0, xt, t, noise), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ Gaussian KL
def test_normal_kl_of_identical_distributions_is_zero():
    m, lv = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    assert normal_kl(m, lv, m, lv).abs().max().item() == 0.0


def test_normal_kl_matches_closed_form():
    g = torch.Generator().manual_seed(1)
    m1, m2 = torch.randn(2, 500, generator=g, dtype=torch.float64)
    s1, s2 = torch.rand(2, 500, generator=g, dtype=torch.float64) + 0.1
    closed = torch.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    got = normal_kl(m1, 2 * torch.log(s1), m2, 2 * torch.log(s2))
    torch.testing.assert_close(got, closed, rtol=1e-12, atol=1e-12)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, s1), torch.distributions.Normal(m2, s2))
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert (got > 0).all()


# ------------------------------------------------------------------ discretised decoder
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decoder_probabilities_over_256_bins_sum_to_one(dtype):
    g = torch.Generator().manual_seed(2)
    levels = (torch.arange(256, dtype=dtype) / 127.5 - 1)[:, None]       # [256, 1]
    means = (torch.rand(1, 300, generator=g) * 3 - 1.5).to(dtype)        # some outside [-1, 1]
    log_scales = (torch.rand(1, 300, generator=g) * 6 - 7).to(dtype)     # σ from e^-7 to e^-1
    probs = discretized_gaussian_log_likelihood(levels, means, log_scales).exp()
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(probs.sum(0), torch.ones(300, dtype=dtype), rtol=0, atol=tol)


def test_decoder_bin_probability_matches_erf():
    """An interior bin is Φ((x + 1/255 - m)/σ) - Φ((x - 1/255 - m)/σ), an edge bin a tail."""
    phi = lambda z: 0.5 * math.erfc(-z / math.sqrt(2))  # noqa: E731  (Φ, accurate in the lower tail)
    m, s = 0.1, 0.05
    for k in (0, 100, 140, 255):
        x = k / 127.5 - 1
        lo, hi = (x - 1 / 255 - m) / s, (x + 1 / 255 - m) / s
        inner = phi(hi) - phi(lo) if x <= m else phi(-lo) - phi(-hi)  # the tail side: no cancellation
        expected = phi(hi) if k == 0 else (phi(-lo) if k == 255 else inner)
        got = discretized_gaussian_log_likelihood(torch.tensor([x], dtype=torch.float64),
                                                  torch.tensor([m], dtype=torch.float64),
                                                  torch.tensor([math.log(s)], dtype=torch.float64)).exp().item()
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-300)


# ------------------------------------------------------------------ the bound at its analytic minimum
def posterior_x0(d, xt, t):
    """E[x_0 | x_t] and Var[x_0 | x_t] for x_0 ~ N(MU, diag(STD²)), per dimension."""
    a = d.alphas_cumprod[t][:, None]
    s2 = STD**2
    mean = MU + a.sqrt() * s2 / (a * s2 + 1 - a) * (xt - a.sqrt() * MU)
    var = s2 * (1 - a) / (a * s2 + 1 - a)
    return mean, var


@pytest.mark.parametrize("t_index", [1, 10, 200, 999])
def test_vlb_terms_at_the_analytic_minimum_for_gaussian_data(d, t_index):
    """With the exact denoiser E[x0|xt], E[L_t] = coef1² Var[x0|xt] / (2 β̃_t) for σ² = β̃ (fixed_small);
    with the optimal learned σ*² = β̃ + coef1² Var[x0|xt] it is ½ log(σ*²/β̃), lower still;
    any other denoiser or variance does worse."""
    g = torch.Generator().manual_seed(3)
    n = 50_000
    x0 = MU + STD * torch.randn(n, 2, generator=g, dtype=torch.float64)
    t = torch.full((n,), t_index)
    xt = q_sample(d, x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    x0_hat, x0_var = posterior_x0(d, xt, t)
    c1, post_var = d.posterior_mean_coef1[t_index], d.posterior_variance[t_index]
    mean_var = c1**2 * x0_var[0]                              # Var[μ̃(x_t, x_0) | x_t], per dimension
    exact = Prediction(x0=x0_hat, eps=torch.zeros_like(x0))

    # (1) fixed_small: only the mean part of the KL remains
    got = vlb_terms(d, x0, xt, t, exact, "fixed_small").mean().item()
    closed = (mean_var / (2 * post_var)).mean().item()
    assert got == pytest.approx(closed, rel=0.02)
    delta = 0.2  # a biased denoiser pays c1² δ² / (2 β̃) more
    worse = vlb_terms(d, x0, xt, t, Prediction(x0=x0_hat + delta, eps=exact.eps), "fixed_small").mean().item()
    assert worse - got == pytest.approx((c1**2 * delta**2 / (2 * post_var)).item(), rel=0.05)

    # (2) learned at the optimum σ*²: choose v so that log Σ_θ = log σ*²
    opt_var = post_var + mean_var
    log_b, log_bt = math.log(d.betas[t_index]), d.posterior_log_variance_clipped[t_index].item()
    v = 2 * (torch.log(opt_var) - log_bt) / (log_b - log_bt) - 1
    assert (v >= -1).all() and (v <= 1).all()                 # the optimum lies between β̃ and β for STD < 1
    log_var = learned_log_variance(d, t, v.expand(n, 2))
    got_learned = vlb_terms(d, x0, xt, t, Prediction(x0=x0_hat, eps=exact.eps, log_variance=log_var),
                            "learned").mean().item()
    closed_learned = (0.5 * torch.log(opt_var / post_var)).mean().item()
    assert got_learned == pytest.approx(closed_learned, rel=0.02)
    assert got_learned < got
    assert vlb_terms(d, x0, xt, t, Prediction(x0=x0_hat, eps=exact.eps, log_variance=log_var + 0.3),
                     "learned").mean().item() > got_learned


def test_prior_term_matches_closed_form(d):
    x0 = torch.tensor([[-1.0, 0.0, 1.0]], dtype=torch.float64)
    a = d.alphas_cumprod[-1]
    expected = (0.5 * (-1 - torch.log(1 - a) + (1 - a) + a * x0**2)).mean()
    assert prior_kl(d, x0).item() == pytest.approx(expected.item(), rel=1e-10)


def test_full_bound_adds_its_terms():
    d = Diffusion.from_schedule("cosine", 8)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, 256, (3, 1, 4, 4), generator=g).float() / 127.5 - 1
    model = lambda x, t: 0.3 * x  # noqa: E731  (any ε-predictor gives a valid bound)
    out = nll_bits_per_dim(model, d, x0, prediction="eps", variance="fixed_large", generator=g)
    assert out["terms"].shape == (3, 8)
    torch.testing.assert_close(out["total"], out["terms"].sum(1) + out["prior"])
    torch.testing.assert_close(out["decoder"], out["terms"][:, 0])
    assert (out["terms"][:, 1:] >= 0).all() and (out["total"] > 0).all()



@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_full_bound_of_an_exact_denoiser_on_a_constant_image(variance):
    """Data x_0 = c (one 8-bit level): with the exact x_0-predictor the means agree, so each KL term is
    the variance mismatch ½(log σ_t²/β̃_t + β̃_t/σ_t² - 1) (0 for fixed_small), the decoder term is the
    bin mass -log2(Φ(h/σ_1) - Φ(-h/σ_1)), h = 1/255, and the prior term KL(N(√ᾱ_T c, 1-ᾱ_T) ‖ N(0, 1))."""
    d = Diffusion.from_schedule("linear", 50, dtype=torch.float64)
    c = 130 / 127.5 - 1
    x0 = torch.full((2, 1, 3, 3), c, dtype=torch.float64)
    model = lambda x, t: torch.full_like(x, c)  # noqa: E731
    out = nll_bits_per_dim(model, d, x0, prediction="x0", variance=variance, clip="none",
                           generator=torch.Generator().manual_seed(10))
    log_var, log_post = fixed_log_variance_table(d, variance)[1:], d.posterior_log_variance_clipped[1:]
    kl = 0.5 * (log_var - log_post + torch.exp(log_post - log_var) - 1) / math.log(2)
    torch.testing.assert_close(out["terms"][:, 1:], kl.expand(2, -1), rtol=1e-9, atol=1e-12)
    assert (kl == 0).all() == (variance == "fixed_small")
    sigma = math.exp(0.5 * fixed_log_variance_table(d, variance)[0].item())
    mass = math.erf(1 / 255 / sigma / math.sqrt(2))               # Φ(h/σ) - Φ(-h/σ)
    torch.testing.assert_close(out["decoder"], torch.full((2,), -math.log2(mass), dtype=torch.float64))
    prior = 0.5 * (-1 - math.log(1 - d.alphas_cumprod[-1].item()) + (1 - d.alphas_cumprod[-1].item())
                   + d.alphas_cumprod[-1].item() * c**2) / math.log(2)
    expected = -math.log2(mass) + kl.sum().item() + prior
    torch.testing.assert_close(out["total"], torch.full((2,), expected, dtype=torch.float64))

# ------------------------------------------------------------------ learned variance
@pytest.mark.parametrize("respaced", [False, True])
def test_learned_variance_ends_equal_fixed_small_and_fixed_large(d, respaced):
    dd = respace(d, timestep_subsequence(1000, 50)) if respaced else d
    T = dd.num_timesteps
    t = torch.arange(T)
    xt = torch.zeros(T, 1, 2, 2, dtype=torch.float64)
    for v, fixed in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
        out = torch.cat([torch.zeros_like(xt), torch.full_like(xt, v)], 1)
        lv = to_prediction(dd, "eps", out, xt, t, variance="learned").log_variance
        table = fixed_log_variance_table(dd, fixed)
        # fixed_large uses β̃_2 at t = 0 (improved-diffusion); the learned interpolation's upper end is β_1 there
        torch.testing.assert_close(lv[1:, 0, 0, 0], table[1:], rtol=1e-12, atol=0)
        expected0 = table[0] if fixed == "fixed_small" else torch.log(dd.betas[0])
        assert lv[0, 0, 0, 0].item() == pytest.approx(expected0.item(), rel=1e-12)


def test_wrong_channel_count_is_named(d):
    xt = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="variance='learned' needs a network with 2 output channels"):
        to_prediction(d, "eps", torch.zeros_like(xt), xt, torch.tensor([3, 4]), variance="learned")


def test_sampler_uses_learned_variance():
    """ddpm sampling with a learned-variance output at v = -1 equals fixed_small, at v = +1 differs."""
    d = Diffusion.from_schedule("linear", 100, dtype=torch.float64)

    def eps_model(x, t):
        a = d.alphas_cumprod[t][:, None]
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * STD**2 + 1 - a)

    def run(variance, v=None):
        model = eps_model if v is None else (lambda x, t: torch.cat([eps_model(x, t), torch.full_like(x, v)], 1))
        g = torch.Generator().manual_seed(5)
        return sample(model, d, (500, 2), sampler="ddpm", steps=20, clip="none", generator=g,
                      variance=variance, options={"variance": "fixed_small"})

    torch.testing.assert_close(run("learned", -1.0), run("fixed_small"), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(run("learned", 1.0), run("fixed_small"))


def test_model_spec_stores_variance_and_reads_old_checkpoints():
    spec = ModelSpec(channels=3, variance="learned")
    assert spec.out_channels == 6
    again = ModelSpec.from_dict(spec.to_dict())
    assert again.variance == "learned" and again.out_channels == 6
    old = spec.to_dict()
    del old["variance"]
    assert ModelSpec.from_dict(old).variance == "fixed_small" and ModelSpec.from_dict(old).out_channels == 3


# ------------------------------------------------------------------ objectives
class Affine(torch.nn.Module):
    """out = [a x_t, b] — a mean part and (learned) a variance part with separate parameters."""

    def __init__(self, learned: bool):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor(0.5)), torch.nn.Parameter(torch.tensor(0.2))
        self.learned = learned

    def forward(self, x, t):
        mean = self.a * x
        return torch.cat([mean, self.b * torch.ones_like(x)], 1) if self.learned else mean


def terms_and_grads(loss, variance, key):
    d = Diffusion.from_schedule("linear", 50)
    g = torch.Generator().manual_seed(6)
    x0 = torch.rand(16, 1, 4, 4, generator=g) * 2 - 1
    t, noise = torch.randint(50, (16,), generator=g), torch.randn(16, 1, 4, 4, generator=g)
    model = Affine(variance == "learned")
    terms = training_terms(model, d, x0, t, noise, "eps", loss, variance)
    terms[key].sum().backward()
    return terms, model.a.grad, model.b.grad


def test_vlb_loss_trains_mean_and_variance():
    terms, ga, gb = terms_and_grads("vlb", "learned", "loss")
    assert set(terms) == {"vlb", "loss"} and ga.abs() > 0 and gb.abs() > 0


def test_hybrid_stops_the_bounds_gradient_to_the_mean():
    terms, ga, gb = terms_and_grads("hybrid", "learned", "vlb")
    assert set(terms) == {"mse", "vlb", "loss"}
    assert (ga is None or ga.abs() == 0) and gb.abs() > 0
    torch.testing.assert_close(terms["loss"], terms["mse"] + 1e-3 * terms["vlb"])


def test_simple_loss_is_the_mse_of_the_target():
    terms, ga, _ = terms_and_grads("simple", "fixed_small", "loss")
    assert set(terms) == {"mse", "loss"} and ga.abs() > 0


@pytest.mark.parametrize("loss,variance,sampling,match", [
    ("simple", "learned", "uniform", "variance=learned with loss=simple"),
    ("hybrid", "fixed_small", "uniform", "loss=hybrid with variance=fixed_small"),
    ("hybrid", "fixed_large", "uniform", "loss=hybrid with variance=fixed_large"),
    ("simple", "fixed_small", "importance", "timestep_sampling=importance with loss=simple"),
    ("kl", "fixed_small", "uniform", "unknown loss 'kl'; choose one of simple, vlb, hybrid"),
    ("vlb", "small", "uniform", "unknown variance 'small'"),
])
def test_invalid_combinations_rejected(loss, variance, sampling, match):
    with pytest.raises(ValueError, match=match):
        check_objective(loss, variance, sampling)


@pytest.mark.parametrize("loss,variance,sampling", [
    ("simple", "fixed_small", "uniform"), ("simple", "fixed_large", "uniform"), ("vlb", "fixed_small", "uniform"),
    ("vlb", "fixed_large", "importance"), ("vlb", "learned", "importance"), ("hybrid", "learned", "uniform"),
    ("hybrid", "learned", "importance"),
])
def test_valid_combinations_accepted(loss, variance, sampling):
    check_objective(loss, variance, sampling)


# ------------------------------------------------------------------ importance sampling of t
def test_uniform_sampler_keeps_the_original_stream():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    t, w = UniformSampler(100).sample(32, g1, "cpu")
    assert w is None and torch.equal(t, torch.randint(100, (32,), generator=g2))


def test_importance_sampler_history_and_probabilities():
    T, K = 5, 10
    s = make_timestep_sampler("importance", T)
    assert isinstance(s, ImportanceSampler)
    ref = {t: [] for t in range(T)}
    g = torch.Generator().manual_seed(8)
    for step in range(12):
        if any(len(v) < K for v in ref.values()):  # uniform until every t has K values
            torch.testing.assert_close(s.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))
        t = torch.randint(T, (9,), generator=g) if step else torch.zeros(25, dtype=torch.long)  # 25 > K for t = 0
        losses = torch.rand(t.shape[0], generator=g, dtype=torch.float64) + t
        s.update(t, losses)
        for ti, li in zip(t.tolist(), losses.tolist()):
            ref[ti] = (ref[ti] + [li])[-K:]
    assert all(len(v) == K for v in ref.values())
    for ti in range(T):  # the ring buffer holds exactly the last K values (in some rotation)
        assert sorted(s.history[ti].tolist()) == pytest.approx(sorted(ref[ti]))
    rms = torch.tensor([math.sqrt(sum(x * x for x in ref[ti]) / K) for ti in range(T)], dtype=torch.float64)
    expected = rms / rms.sum() * (1 - 1e-3) + 1e-3 / T
    torch.testing.assert_close(s.probabilities(), expected)
    # the weights 1/(T p_t) make the estimate unbiased: E_p[w] = 1, and larger terms are drawn more often
    t, w = s.sample(200_000, torch.Generator().manual_seed(9), "cpu")
    counts = torch.bincount(t, minlength=T).double() / t.numel()
    torch.testing.assert_close(counts, expected, rtol=0.03, atol=0)
    assert w.double().mean().item() == pytest.approx(1.0, rel=0.01)
    # state round trip
    s2 = ImportanceSampler(T)
    s2.load_state_dict(s.state_dict())
    torch.testing.assert_close(s2.probabilities(), s.probabilities())
    with pytest.raises(ValueError, match="does not match"):
        ImportanceSampler(T + 1).load_state_dict(s.state_dict())
