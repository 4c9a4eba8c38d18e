"""One conversion layer between what the network outputs and what samplers and
losses need.

``prediction`` names the network's target:
- ``eps``  the noise ε (Ho et al. 2020, eq. 11)
- ``x0``   the clean image x_0
- ``v``    v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho 2022)
- ``mean`` the posterior mean μ̃_t(x_t, x_0) directly (Ho et al. 2020, Table 2)

``to_prediction`` turns a raw output into x̂_0 and ε̂ (both always available), and
``training_target`` gives the regression target for L_simple-style losses.

With ``variance="learned"`` the network outputs 2C channels: the first C are the
prediction above, the last C the variance interpolation v of Nichol & Dhariwal 2021
(eq. 15, see ``ddpm.variance``), which ``to_prediction`` turns into ``log_variance``.

``clip`` names what happens to x̂_0 at sampling time (``clip_x0``):
- ``static``  clamp to [-1, 1], as the official DDPM code does
- ``dynamic`` Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3)
- ``none``    leave it alone
"""

import math
from dataclasses import dataclass

import torch

from ddpm.diffusion import (Diffusion, eps_from_x0, q_posterior_mean_variance, v_from_x0_eps, x0_from_eps,
                            x0_from_posterior_mean, x0_from_v)
from ddpm.config.diffusion import PREDICTIONS
from ddpm.config.sampling import CLIPS
from ddpm.errors import InputError
from ddpm.variance import check_variance, learned_log_variance



@dataclass
class Prediction:
    x0: torch.Tensor
    eps: torch.Tensor
    # log σ_t² of p(x_{t-1} | x_t) when the network predicts it (variance = learned), else None
    log_variance: torch.Tensor | None = None


def split_output(output: torch.Tensor, channels: int, variance: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction part, variance part v or None) of a raw network output for ``channels`` image channels."""
    check_variance(variance)
    expected = 2 * channels if variance == "learned" else channels
    if output.shape[1] != expected:
        raise InputError(f"variance={variance!r} needs a network with {expected} output channels for "
                         f"{channels}-channel images, got {output.shape[1]}")
    if variance == "learned":
        return output[:, :channels], output[:, channels:]
    return output, None


def to_prediction(d: Diffusion, prediction: str, output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                  clip: str = "none", percentile: float = 99.5, variance: str = "fixed_small") -> Prediction:
    """Model output → (x̂_0, ε̂). Unless ``clip`` is ``none``, x̂_0 is clipped (``clip_x0``) and ε̂
    recomputed from it, so that the pair stays consistent with x_t.

    With ``variance="learned"`` also log Σ_θ from the output's extra channels, on ``d``'s β and β̃."""
    output, v = split_output(output, xt.shape[1], variance)
    if prediction == "eps":
        x0 = x0_from_eps(d, xt, t, output)
        eps = output
    elif prediction == "x0":
        x0, eps = output, None
    elif prediction == "v":
        x0, eps = x0_from_v(d, xt, t, output), None
    elif prediction == "mean":
        x0, eps = x0_from_posterior_mean(d, xt, t, output), None
    else:
        raise InputError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    if clip != "none":
        x0 = clip_x0(x0, clip, percentile)
        eps = None
    if eps is None:
        eps = eps_from_x0(d, xt, t, x0)
    log_variance = learned_log_variance(d, t, v) if v is not None else None
    return Prediction(x0=x0, eps=eps, log_variance=log_variance)


def check_clip(clip: str, percentile: float = 99.5) -> None:
    """Reject an unknown ``clip``, and a ``percentile`` outside (50, 100] for ``dynamic``."""
    if clip not in CLIPS:
        raise InputError(f"unknown clip {clip!r}; choose one of {', '.join(CLIPS)}")
    if clip == "dynamic" and not 50 < percentile <= 100:
        raise InputError(f"percentile must be in (50, 100], got {percentile}")


def clip_x0(x0: torch.Tensor, clip: str, percentile: float = 99.5) -> torch.Tensor:
    """x̂_0 clipped per ``clip`` (see the module docstring); ``percentile`` is used by ``dynamic`` only.

    Dynamic thresholding, per sample (Saharia et al. 2022, sec. 2.3):
      (1) s = the p-th percentile of |x̂_0| over the sample's elements (nearest-rank),
      (2) s = max(s, 1),
      (3) x̂_0 = clamp(x̂_0, -s, s) / s.
    No host synchronisation: s stays a tensor.
    """
    check_clip(clip, percentile)
    if clip == "none":
        return x0
    if clip == "static":
        return x0.clamp(-1.0, 1.0)
    # dynamic
    flat = x0.abs().reshape(x0.shape[0], -1)
    k = max(1, math.ceil(percentile / 100 * flat.shape[1]))
    s = flat.kthvalue(k, dim=1).values.clamp(min=1.0)  # (1), (2)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s  # (3)


def training_target(d: Diffusion, prediction: str, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor) -> torch.Tensor:
    """What the network regresses onto for ``prediction``."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        return v_from_x0_eps(d, x0, t, noise)
    if prediction == "mean":
        return q_posterior_mean_variance(d, x0, xt, t)[0]
    raise InputError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
