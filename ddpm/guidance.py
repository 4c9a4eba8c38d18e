"""Class conditioning and classifier-free guidance (Ho & Salimans 2022).

``conditioning`` names what the network sees besides x_t and t:
- ``none``   nothing: the model of p(x)
- ``class``  a class label y ∈ {0, …, K-1}, embedded and added to the timestep embedding
             (guided-diffusion's ``num_classes``/``label_emb``); the extra index K is the
             null class ∅ ("no label").

Training replaces each label by ∅ with probability ``cond_drop`` (``drop_labels``), so one
network learns both ε(x_t, y) and the unconditional ε(x_t, ∅) (Ho & Salimans 2022, Algorithm 1).

Guidance with weight w, in Ho & Salimans' convention (eq. 6; diffusers' ``guidance_scale`` is
s = 1 + w):

    ε̃(x_t, y) = (1 + w) ε(x_t, y) − w ε(x_t, ∅)

so w = 0 is the plain conditional model. The samplers apply it to ε, after a network that
predicts x_0, v or the mean was converted to ε (``ddpm.samplers``), and evaluate the two
terms in one batched forward pass of 2B. Two refinements, both off by default:
- ``rescale`` φ (Lin et al. 2024, sec. 3.4): ε̃ ← φ · ε̃ std(ε_c) / std(ε̃) + (1 − φ) ε̃, the
  standard deviations per sample, which undoes the overexposure large w causes.
- ``interval`` (σ_lo, σ_hi) (Kynkäänniemi et al. 2024): guide only the steps whose noise level
  σ = sqrt((1 − ᾱ) / ᾱ) lies in (σ_lo, σ_hi]; elsewhere w = 0, one forward pass of B.
"""

import torch

from ddpm.config.diffusion import CONDITIONINGS, check_choice
from ddpm.errors import InputError

def check_conditioning(conditioning: str) -> None:
    check_choice("conditioning", conditioning, CONDITIONINGS)


def drop_labels(labels: torch.Tensor, p: float, null_label: int, generator: torch.Generator | None) -> torch.Tensor:
    """``labels`` with each entry replaced by ``null_label`` with probability ``p`` (one uniform draw per label)."""
    if not 0 <= p <= 1:
        raise InputError(f"cond_drop must be in [0, 1], got {p}")
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def balanced_labels(n: int, num_classes: int, start: int = 0, device=None) -> torch.Tensor:
    """Labels of the images start … start+n-1 of a class-balanced set: image i has class i mod K."""
    return torch.arange(start, start + n, device=device) % num_classes


def guided_eps(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w: float, rescale: float = 0.0) -> torch.Tensor:
    """ε̃ = (1 + w) ε_c − w ε_u, then rescaled towards std(ε_c) with weight φ = ``rescale`` (Lin et al. 2024)."""
    # (1) Ho & Salimans 2022, eq. 6
    eps = (1 + w) * eps_cond - w * eps_uncond
    if rescale == 0:
        return eps
    # (2) Lin et al. 2024, sec. 3.4: match the conditional prediction's per-sample std, blended by φ
    dims = tuple(range(1, eps.ndim))
    factor = eps_cond.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True)
    return eps * (rescale * factor + (1 - rescale))


def with_label(model, label: int):
    """``model(x, t, y)`` as ``model(x, t)`` with y = ``label`` for every image; with the null class
    that is the unconditional model p(x)."""

    def fixed(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, t, torch.full((x.shape[0],), label, device=x.device, dtype=torch.long))

    return fixed
