"""Beta schedules β_1..β_T, computed in float64.

Every schedule returns a float64 tensor of shape [T]; element ``betas[t]`` is the
paper's β_{t+1} (see ``ddpm.diffusion`` for the timestep convention).

- ``linear``    Ho et al. 2020, β from 1e-4 to 0.02 at T=1000. For other T the end
                points are scaled by 1000/T (as improved-diffusion does) so ᾱ_T stays
                close to the T=1000 value; β is clipped at 0.999 (for T < 20).
- ``cosine``    Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = f(t)/f(0),
                f(t) = cos²(((t/T)+s)/(1+s) · π/2), s = 0.008, β clipped at 0.999.
- ``quadratic`` β linear in sqrt-space between the linear schedule's ends (DDIM code).
- ``sigmoid``   β = sigmoid(linspace(-6, 6, T)) rescaled to the linear schedule's ends
                (Xu et al. 2022, GeoDiff).
The linear-family schedules are clipped at 0.999 like the cosine one.
"""

import math

import torch

from ddpm.config.diffusion import SCHEDULES
from ddpm.errors import InputError

MAX_BETA = 0.999


def _linear_ends(num_timesteps: int) -> tuple[float, float]:
    scale = 1000.0 / num_timesteps
    return scale * 1e-4, scale * 0.02


def linear_betas(num_timesteps: int) -> torch.Tensor:
    start, end = _linear_ends(num_timesteps)
    return torch.linspace(start, end, num_timesteps, dtype=torch.float64)


def quadratic_betas(num_timesteps: int) -> torch.Tensor:
    start, end = _linear_ends(num_timesteps)
    return torch.linspace(start**0.5, end**0.5, num_timesteps, dtype=torch.float64) ** 2


def sigmoid_betas(num_timesteps: int) -> torch.Tensor:
    start, end = _linear_ends(num_timesteps)
    x = torch.linspace(-6.0, 6.0, num_timesteps, dtype=torch.float64)
    return torch.sigmoid(x) * (end - start) + start


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = MAX_BETA) -> torch.Tensor:
    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=max_beta)


def make_betas(name: str, num_timesteps: int) -> torch.Tensor:
    """β schedule ``name`` with ``num_timesteps`` steps, float64, shape [T]."""
    builders = {
        "linear": linear_betas,
        "cosine": cosine_betas,
        "quadratic": quadratic_betas,
        "sigmoid": sigmoid_betas,
    }
    if name not in builders:
        raise InputError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if num_timesteps < 1:
        raise InputError(f"num_timesteps must be >= 1, got {num_timesteps}")
    return builders[name](num_timesteps).clamp(max=MAX_BETA)
