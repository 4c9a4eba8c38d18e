"""Samplers: one shared loop, one small step function per sampler.

The loop (``sample``) picks a subsequence of timesteps, respaces the diffusion onto
it (``ddpm.diffusion.respace``), draws x_T ~ N(0, I) and walks i = S-1 … 0. At each
step it calls the network with the *original* timestep ``timesteps[i]``, converts the
output to (x̂_0, ε̂) with ``ddpm.predictions.to_prediction`` and hands that to the
sampler's step function:

    step(x, i, pred, d, state, generator, **options) -> x_prev

where ``d`` is the respaced diffusion (index i ↔ original timestep ``timesteps[i]``)
and ``state`` is a dict the step may use to carry information between steps
(multistep solvers). All randomness comes from the explicit ``generator``.
"""

from collections.abc import Callable

import torch

from ddpm.diffusion import Diffusion, extract, respace, timestep_subsequence
from ddpm.predictions import Prediction, to_prediction

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def ddpm_step(x, i, pred: Prediction, d: Diffusion, state, generator, variance: str = "fixed_small"):
    """Ancestral step x_{t-1} ~ N(μ̃_t(x_t, x̂_0), σ_t² I) (Ho et al. 2020, Algorithm 2).

    ``fixed_small``: σ_t² = β̃_t; ``fixed_large``: σ_t² = β_t (with β̃_2 in place of β_1,
    as improved-diffusion does, so the first step's variance is not ~0 but tiny).
    On a respaced diffusion these are the respaced β and β̃. When the network predicts
    its variance (``pred.log_variance`` is set), that is used instead.
    """
    t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
    # (1) posterior mean, eq. (7), with the predicted x_0
    mean = extract(d.posterior_mean_coef1, t, x.ndim) * pred.x0 + extract(d.posterior_mean_coef2, t, x.ndim) * x
    if i == 0:
        return mean
    # (2) σ_t: the square root of the variance, σ_t = sqrt(β̃_t) or sqrt(β_t)
    if pred.log_variance is not None:
        return mean + torch.exp(0.5 * pred.log_variance) * _noise_like(x, generator)
    if variance == "fixed_small":
        log_var = d.posterior_log_variance_clipped
    elif variance == "fixed_large":
        log_var = torch.log(torch.cat([d.posterior_variance[1:2], d.betas[1:]]))
    else:
        raise ValueError(f"unknown variance {variance!r}; choose fixed_small or fixed_large")
    # (3) x_{t-1} = μ̃ + σ_t z
    return mean + torch.exp(0.5 * extract(log_var, t, x.ndim)) * _noise_like(x, generator)


def ddim_step(x, i, pred: Prediction, d: Diffusion, state, generator, eta: float = 0.0):
    """DDIM step (Song et al. 2021, eq. 12) with σ_t(η) from eq. 16.

    x_{t-1} = sqrt(ᾱ_{t-1}) x̂_0 + sqrt(1 - ᾱ_{t-1} - σ_t²) ε̂ + σ_t z,
    σ_t = η sqrt((1 - ᾱ_{t-1}) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_{t-1}).
    """
    t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
    a_t = extract(d.alphas_cumprod, t, x.ndim)
    a_prev = extract(d.alphas_cumprod_prev, t, x.ndim)
    sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t)) * torch.sqrt(1 - a_t / a_prev)
    x_prev = a_prev.sqrt() * pred.x0 + torch.sqrt((1 - a_prev - sigma**2).clamp(min=0)) * pred.eps
    if eta > 0 and i > 0:
        x_prev = x_prev + sigma * _noise_like(x, generator)
    return x_prev


SAMPLERS: dict[str, Callable] = {"ddpm": ddpm_step, "ddim": ddim_step}


def sample(
    model: Denoiser,
    diffusion: Diffusion,
    shape: tuple[int, ...],
    *,
    sampler: str = "ddpm",
    steps: int | None = None,
    spacing: str = "linspace",
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = True,
    generator: torch.Generator | None = None,
    options: dict | None = None,
    progress: Callable[[int], None] | None = None,
    x_T: torch.Tensor | None = None,
    on_step: Callable[[int, torch.Tensor, Prediction], None] | None = None,
) -> torch.Tensor:
    """Generate a batch of shape ``shape`` in [-1, 1] (not clamped) with ``sampler``.

    ``model(x, t)`` is called with the original timesteps. ``steps`` defaults to T.
    ``variance`` is the model's (``ModelSpec.variance``): with ``learned`` the network's
    log-variance, on the respaced β and β̃, goes to the step function in ``pred.log_variance``.
    ``options`` go to the step function (e.g. ``eta`` for ddim, ``variance`` for ddpm).
    ``progress``, when given, is called with 1 after every step. ``on_step(t, x_prev, pred)``,
    when given, sees every step's result (original timestep t), e.g. for denoising strips.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    step_fn = SAMPLERS[sampler]
    timesteps = timestep_subsequence(diffusion.num_timesteps, steps or diffusion.num_timesteps, spacing)
    d = respace(diffusion, timesteps)
    device = diffusion.device
    t_orig = torch.tensor(timesteps, device=device, dtype=torch.long)
    x = _noise_like(torch.empty(shape, device=device), generator) if x_T is None else x_T.to(device)
    state: dict = {}
    with torch.inference_mode():
        for i in reversed(range(len(timesteps))):
            idx = torch.full((shape[0],), i, device=device, dtype=torch.long)
            out = model(x, t_orig[idx])
            pred = to_prediction(d, prediction, out.float(), x, idx, clip_x0=clip_x0, variance=variance)
            x = step_fn(x, i, pred, d, state, generator, **(options or {}))
            if on_step is not None:
                on_step(timesteps[i], x, pred)
            if progress is not None:
                progress(1)
    return x
