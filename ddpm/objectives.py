"""Training objectives.

``loss`` names the objective:
- ``simple``  L_simple (Ho et al. 2020, eq. 14), the unweighted mean squared error between
              the network output and its target (ε, x_0, v or μ̃ depending on ``prediction``).
- ``vlb``     the variational bound itself (Ho et al. 2020, eq. 5; ``ddpm.likelihood``):
              L_vlb ≈ T · L_t at the example's t, an unbiased estimate of Σ_t L_t, in bits/dim
              (improved-diffusion's ``rescaled_kl``).
- ``hybrid``  L_hybrid = L_simple + λ L_vlb with a stop-gradient on the mean in L_vlb, so the
              bound trains only the variance (Nichol & Dhariwal 2021, sec. 3.1; λ = 0.001).
              With T = 1000 this is improved-diffusion's ``mse + vb · T / 1000``.

t ~ Uniform{0, …, T-1} or importance-sampled (``ddpm.timestep_sampling``), ε ~ N(0, I).
A class-conditional network gets the batch's labels (some already replaced by the null
class, ``ddpm.guidance.drop_labels``) as ``model(x_t, t, labels)``.
"""

import torch

from ddpm.config.diffusion import check_objective
from ddpm.diffusion import Diffusion, q_sample
from ddpm.likelihood import LOG2, vlb_terms
from ddpm.predictions import split_output, to_prediction, training_target

def training_terms(model, d: Diffusion, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                   prediction: str = "eps", loss: str = "simple", variance: str = "fixed_small",
                   hybrid_lambda: float = 1.0e-3, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-example terms, each shape [B]: ``loss`` (what is minimised), and ``mse`` and/or ``vlb``
    (T · L_t in bits/dim) when the objective uses them. ``labels``: a class-conditional model's."""
    check_objective(loss, variance)
    # (1) x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε   (eq. 4)
    xt = q_sample(d, x0, t, noise)
    out = (model(xt, t) if labels is None else model(xt, t, labels)).float()
    mean_out, var_out = split_output(out, x0.shape[1], variance)
    terms = {}
    if loss in ("simple", "hybrid"):
        # (2) ‖target - f_θ(x_t, t)‖², averaged over pixels   (eq. 14 for ε)
        target = training_target(d, prediction, x0, xt, t, noise)
        terms["mse"] = (mean_out - target).pow(2).flatten(1).mean(1)
    if loss in ("vlb", "hybrid"):
        # (3) L_t of the bound; for hybrid the mean is stop-gradiented (Nichol & Dhariwal sec. 3.1)
        if loss == "hybrid":
            out = torch.cat([mean_out.detach(), var_out], 1)
        pred = to_prediction(d, prediction, out, xt, t, variance=variance)
        # (4) T · L_t in bits/dim: an unbiased estimate of Σ_t L_t under uniform t
        terms["vlb"] = d.num_timesteps * vlb_terms(d, x0, xt, t, pred, variance) / LOG2
    if loss == "simple":
        terms["loss"] = terms["mse"]
    elif loss == "vlb":
        terms["loss"] = terms["vlb"]
    else:
        # (5) L_hybrid = L_simple + λ L_vlb   (eq. 16)
        terms["loss"] = terms["mse"] + hybrid_lambda * terms["vlb"]
    return terms
