"""Held-out denoising error: how well a network predicts the noise of images it never saw.

``denoising_mse`` is L_simple (Ho et al. 2020, eq. 14), E‖ε̂_θ(x_t, t) − ε‖², in ε space
whatever the network's ``prediction`` (ε̂ comes from ``ddpm.predictions``, unclipped), on
held-out images at a fixed grid of timesteps with fixed noise: image i is noised at
``timestep_grid(T, k)[i mod k]`` with ε drawn on the CPU from a generator seeded with
``seed``. So two networks (raw and EMA weights, trained and untrained) are scored on the
very same x_t, and a network that outputs noise scores about 1 or worse.
"""

import torch

from ddpm.diffusion import Diffusion, q_sample
from ddpm.errors import InputError
from ddpm.predictions import to_prediction


def timestep_grid(num_timesteps: int, k: int) -> torch.Tensor:
    """k timestep indices at the midpoints of k equal slices of {0, …, T−1}."""
    if not 1 <= k <= num_timesteps:
        raise InputError(f"the grid needs 1 <= k <= T = {num_timesteps} timesteps, got {k}")
    return ((torch.arange(k, dtype=torch.float64) + 0.5) * num_timesteps / k).long()


@torch.no_grad()
def denoising_mse(net: torch.nn.Module, diffusion: Diffusion, x0: torch.Tensor, *, prediction: str = "eps",
                  variance: str = "fixed_small", num_timesteps: int = 8, seed: int = 0,
                  batch_size: int = 256, label: int | None = None) -> dict:
    """{"mse": mean over images and pixels, "by_timestep": {t: mse of the images at t}} of
    ``net`` (put in eval mode) on the images ``x0`` in [-1, 1], on ``diffusion``'s device.
    ``label``: a class-conditional ``net`` is called with this class for every image (its
    null class scores the unconditional model p(x)); None for an unconditional ``net``."""
    grid = timestep_grid(diffusion.num_timesteps, num_timesteps)
    n = x0.shape[0]
    t_all = grid[torch.arange(n) % len(grid)]
    noise_all = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    device = diffusion.device
    net.eval()
    errors = []
    for i in range(0, n, batch_size):
        x = x0[i:i + batch_size].to(device, torch.float32)
        t, noise = t_all[i:i + batch_size].to(device), noise_all[i:i + batch_size].to(device)
        xt = q_sample(diffusion, x, t, noise)
        out = net(xt, t) if label is None else net(xt, t, torch.full_like(t, label))
        pred = to_prediction(diffusion, prediction, out.float(), xt, t, variance=variance)
        errors.append((pred.eps - noise).pow(2).flatten(1).mean(1).cpu())
    per_image = torch.cat(errors).double()
    by_t = {int(t): per_image[t_all == t].mean().item() for t in grid}
    return {"mse": per_image.mean().item(), "by_timestep": by_t}
