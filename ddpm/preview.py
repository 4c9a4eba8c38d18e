"""Preview grids while training: a few samples of the model so far, cheaply.

Ancestral sampling x_{t-1} ~ q(x_{t-1} | x_t, x̂_0) = N(μ̃_t(x_t, x̂_0), β̃_t I) (Ho et al.
2020, Algorithm 2 with σ_t² = β̃_t, or the network's own Σ_θ when it learns it) on the
diffusion respaced to ``steps`` evenly spaced timesteps (improved-diffusion's respacing),
with x̂_0 clamped to [-1, 1]. It is built from ``ddpm.diffusion`` and ``ddpm.predictions``
only, not from ``ddpm.samplers``: training depends on this file, so a sampler edit never
re-runs training. The samplers proper (``ddpm.samplers``) are what the sample stage uses.
"""

import torch

from ddpm.diffusion import Diffusion, q_posterior_mean_variance, respace, timestep_subsequence
from ddpm.predictions import to_prediction


def preview(model, diffusion: Diffusion, shape: tuple[int, ...], *, steps: int = 50, prediction: str = "eps",
            variance: str = "fixed_small", generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestral samples through the posterior q(x_{t-1} | x_t, x̂_0) over ``steps`` respaced timesteps, in [-1, 1]."""
    timesteps = timestep_subsequence(diffusion.num_timesteps, min(steps, diffusion.num_timesteps))
    d = respace(diffusion, timesteps)
    t_orig = torch.tensor(timesteps, device=d.device, dtype=torch.long)
    x = torch.randn(shape, generator=generator, device=d.device)
    with torch.inference_mode():
        for i in reversed(range(len(timesteps))):
            idx = torch.full((shape[0],), i, device=d.device, dtype=torch.long)
            pred = to_prediction(d, prediction, model(x, t_orig[idx]).float(), x, idx, clip="static",
                                 variance=variance)
            mean, _, log_var = q_posterior_mean_variance(d, pred.x0, x, idx)
            if i == 0:
                x = mean
                break
            if pred.log_variance is not None:
                log_var = pred.log_variance
            x = mean + torch.exp(0.5 * log_var) * torch.randn(shape, generator=generator, device=d.device)
    return x.clamp(-1, 1)
