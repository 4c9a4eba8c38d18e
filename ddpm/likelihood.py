"""The variational bound on the negative log-likelihood and its terms, in nats per dimension
(divide by log 2 for bits per dimension).

Ho et al. 2020, eq. (5):
    L = L_T + Σ_{t>1} L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) ‖ N(0, I))                               the prior term
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t))           Gaussian KLs
    L_0     = -log p_θ(x_0 | x_1), the discretised Gaussian decoder for 8-bit data, eq. (13)

With the timestep convention of ``ddpm.diffusion`` (index t is the paper's t+1), index t = 0
is the decoder term L_0 and index t ≥ 1 the KL term L_t (paper's L_{t}, conditioned on x_{t+1}).
The formulas follow improved-diffusion's ``losses.py`` and ``calc_bpd_loop``.
"""

import math
from collections.abc import Callable

import torch

from ddpm.diffusion import Diffusion, q_mean_variance, q_posterior_mean_variance, q_sample
from ddpm.predictions import Prediction, to_prediction
from ddpm.variance import model_log_variance

LOG2 = math.log(2.0)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: per-example value per dimension."""
    return x.flatten(1).mean(1)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) per element, in nats:
    ½ (-1 + logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)² e^(-logvar2)),
    with -1 + e^x written expm1(x), so nearly equal variances lose no precision (and equal ones give 0)."""
    return 0.5 * ((logvar2 - logvar1) + torch.expm1(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) = ½ erfc(-x / √2): accurate to full relative precision in the lower tail
    (``torch.special.ndtr`` loses digits there in float64 and underflows to 0 at x = -10)."""
    return 0.5 * torch.erfc(-x / math.sqrt(2.0))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log p(x) per element, in nats, for x ∈ [-1, 1] holding 8-bit data (k / 127.5 - 1).

    Ho et al. 2020, eq. (13): the Gaussian N(means, e^(2 log_scales)) integrated over the bin
    [x - 1/255, x + 1/255], with the edge bins extended to -∞ (x = -1) and +∞ (x = 1), so
    the probabilities of the 256 levels sum to 1. Uses the exact normal CDF (improved-diffusion
    uses a tanh approximation), evaluated on the tail side, and log Φ for the edge bins.
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    # (1) standardised bin edges
    plus_in = inv_stdv * (centered + 1.0 / 255.0)
    min_in = inv_stdv * (centered - 1.0 / 255.0)
    # (2) log Φ(plus) for the first bin, log (1 - Φ(min)) = log Φ(-min) for the last
    log_cdf_plus = torch.special.log_ndtr(plus_in)
    log_one_minus_cdf_min = torch.special.log_ndtr(-min_in)
    # (3) interior bins: log (Φ(plus) - Φ(min)), floored at 1e-12 as improved-diffusion does; above the
    #     mean as Φ(-min) - Φ(-plus), so that the difference is of two small numbers, not two near 1
    upper = centered > 0
    cdf_delta = torch.where(upper, standard_normal_cdf(-min_in) - standard_normal_cdf(-plus_in),
                            standard_normal_cdf(plus_in) - standard_normal_cdf(min_in))
    log_delta = torch.log(cdf_delta.clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vlb_terms(d: Diffusion, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, pred: Prediction,
              variance: str) -> torch.Tensor:
    """The bound's term at each example's t, nats per dimension, shape [B]:
    L_0 (decoder NLL) where t = 0 and KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t)) elsewhere.

    ``pred`` is the network's prediction at (x_t, t) (with ``log_variance`` when learned);
    fixed variances use their table on ``d``.
    """
    # (1) the true posterior q(x_{t-1} | x_t, x_0), eqs. (6)-(7)
    true_mean, _, true_log_var = q_posterior_mean_variance(d, x0, xt, t)
    # (2) the model p_θ(x_{t-1} | x_t) = N(μ̃_t(x_t, x̂_0), σ_t²), eq. (11) via x̂_0
    model_mean = q_posterior_mean_variance(d, pred.x0, xt, t)[0]
    model_log_var = model_log_variance(d, variance, t, xt.ndim, pred.log_variance).expand_as(model_mean)
    # (3) L_{t-1}: Gaussian KL per pixel, averaged over pixels
    kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var))
    # (4) L_0: discretised decoder, eq. (13), evaluated at the data x_0
    decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var))
    return torch.where(t == 0, decoder_nll, kl)


def prior_kl(d: Diffusion, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) ‖ N(0, I)), nats per dimension, shape [B]. No parameters: a constant
    of training, but part of the bound."""
    t = torch.full((x0.shape[0],), d.num_timesteps - 1, device=x0.device, dtype=torch.long)
    mean, _, log_var = q_mean_variance(d, x0, t)
    return mean_flat(normal_kl(mean, log_var.expand_as(mean), torch.zeros_like(mean), torch.zeros_like(mean)))


def nll_bits_per_dim(model, d: Diffusion, x0: torch.Tensor, *, prediction: str, variance: str,
                     clip: str = "static", generator: torch.Generator | None = None,
                     progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """The full bound L_T + Σ_t L_{t-1} + L_0 of a batch ``x0`` (8-bit data in [-1, 1]), in bits/dim.

    One forward pass per timestep (T in all), each at a fresh x_t ~ q(x_t | x_0): an unbiased,
    single-sample estimate of every term (improved-diffusion's ``calc_bpd_loop``). ``clip``
    (static | none) clamps x̂_0 to [-1, 1] or not (a valid decoder all the same). Returns per example
    ``total`` [B], ``prior`` [B], ``decoder`` [B] (L_0) and ``terms`` [B, T] (index t as in
    ``vlb_terms``); ``progress`` is called with 1 after every timestep.
    """
    B, T = x0.shape[0], d.num_timesteps
    terms = torch.zeros(B, T, device=x0.device, dtype=torch.float64)
    with torch.inference_mode():
        for i in reversed(range(T)):
            t = torch.full((B,), i, device=x0.device, dtype=torch.long)
            # (1) x_t ~ q(x_t | x_0), eq. (4)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            xt = q_sample(d, x0, t, noise)
            # (2) p_θ(x_{t-1} | x_t) from the network, and the bound's term at t
            pred = to_prediction(d, prediction, model(xt, t).float(), xt, t, clip=clip, variance=variance)
            terms[:, i] = vlb_terms(d, x0, xt, t, pred, variance).double()
            if progress is not None:
                progress(1)
        # (3) L_T, the prior term
        prior = prior_kl(d, x0).double()
    return {"total": (terms.sum(1) + prior) / LOG2, "prior": prior / LOG2, "decoder": terms[:, 0] / LOG2,
            "terms": terms / LOG2}
