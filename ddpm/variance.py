"""The reverse-process variance σ_t² of p_θ(x_{t-1} | x_t) = N(μ_θ(x_t, t), σ_t² I).

``variance`` names the choice:
- ``fixed_small``  σ_t² = β̃_t, the posterior variance (Ho et al. 2020, sec. 3.2); its log is
                   clipped at t = 0 with β̃_2 (``posterior_log_variance_clipped``)
- ``fixed_large``  σ_t² = β_t (Ho et al. 2020, sec. 3.2), with β̃_2 in place of β_1 at t = 0
                   as improved-diffusion and ``ddpm.samplers.ddpm_step`` do
- ``learned``      the network outputs v per pixel and (Nichol & Dhariwal 2021, eq. 15)
                   Σ_θ = exp(u log β_t + (1 - u) log β̃_t),  u = (v + 1) / 2,
                   so v = -1 gives β̃_t and v = +1 gives β_t. v is not clamped (improved-diffusion
                   does not clamp it either); the network is trained so that v ∈ [-1, 1].

All functions take the diffusion ``d`` they are used with: on a respaced diffusion
(sampling with fewer steps) β and β̃ are the respaced ones, as in improved-diffusion.
"""

import torch

from ddpm.diffusion import Diffusion, extract
from ddpm.config.diffusion import VARIANCES
from ddpm.errors import InputError



def check_variance(variance: str) -> None:
    if variance not in VARIANCES:
        raise InputError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")


def fixed_log_variance_table(d: Diffusion, variance: str) -> torch.Tensor:
    """log σ_t² for every t, shape [T], of a fixed variance (``fixed_small`` or ``fixed_large``)."""
    if variance == "fixed_small":
        return d.posterior_log_variance_clipped
    if variance == "fixed_large":
        if d.num_timesteps == 1:
            return torch.log(d.betas)
        return torch.log(torch.cat([d.posterior_variance[1:2], d.betas[1:]]))
    raise InputError(f"variance {variance!r} is not fixed; choose fixed_small or fixed_large")


def learned_log_variance(d: Diffusion, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """log Σ_θ from the network's extra output ``v`` (eq. 15 of Nichol & Dhariwal 2021)."""
    # (1) the two ends of the interpolation, log β̃_t (clipped) and log β_t
    min_log = extract(d.posterior_log_variance_clipped, t, v.ndim)
    max_log = extract(torch.log(d.betas), t, v.ndim)
    # (2) u = (v + 1) / 2 ∈ [0, 1]: log Σ = u log β_t + (1 - u) log β̃_t
    frac = (v + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


def model_log_variance(d: Diffusion, variance: str, t: torch.Tensor, ndim: int,
                       learned: torch.Tensor | None = None) -> torch.Tensor:
    """log σ_t² broadcastable to [B, …]: the fixed table at t, or ``learned`` (already log Σ_θ)."""
    if variance == "learned":
        if learned is None:
            raise ValueError("variance='learned' needs the network's predicted log-variance")
        return learned
    return extract(fixed_log_variance_table(d, variance), t, ndim)
