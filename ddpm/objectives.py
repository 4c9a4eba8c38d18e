"""Training objectives.

``simple``: L_simple (Ho et al. 2020, eq. 14), the unweighted mean squared error between
the network output and its target (ε, x_0, v or μ̃ depending on ``prediction``), with
t ~ Uniform{0, …, T-1} and ε ~ N(0, I).
"""

import torch

from ddpm.diffusion import Diffusion, q_sample
from ddpm.predictions import training_target

LOSSES = ("simple",)


def training_losses(model, d: Diffusion, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                    prediction: str = "eps", loss: str = "simple") -> torch.Tensor:
    """Per-example loss, shape [B]."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    # (1) x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε   (eq. 4)
    xt = q_sample(d, x0, t, noise)
    # (2) ‖target - f_θ(x_t, t)‖², averaged over pixels   (eq. 14 for ε)
    target = training_target(d, prediction, x0, xt, t, noise)
    out = model(xt, t)
    return (out.float() - target).pow(2).flatten(1).mean(1)
