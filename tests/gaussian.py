"""The analytic oracle: data sets whose optimal denoiser is known in closed form.

For x_0 ~ N(μ, diag(s²)), x_t = sqrt(ᾱ) x_0 + sqrt(1 - ᾱ) ε gives
E[ε | x_t] = sqrt(1 - ᾱ)(x_t - sqrt(ᾱ) μ) / (ᾱ s² + 1 - ᾱ); for a mixture of such Gaussians the
posterior responsibilities weight the components' posterior means. Samplers, guidance and the
predictions are checked against these exact predictors (float64).
"""

import torch

F64 = torch.float64
MU, STD = torch.tensor([0.5, -0.3], dtype=F64), torch.tensor([0.2, 0.4], dtype=F64)
# mixture: weights, component means [K, 2], component stds [K, 2]
W = torch.tensor([0.3, 0.7], dtype=F64)
M = torch.tensor([[-0.6, 0.2], [0.5, -0.3]], dtype=F64)
S = torch.tensor([[0.15, 0.25], [0.2, 0.1]], dtype=F64)


def gaussian_eps(a, x, mu, s):
    """E[ε | x_t] for x_0 ~ N(μ, diag(s²)) (μ, s per row or shared): sqrt(1-ᾱ)(x_t - sqrt(ᾱ) μ) / (ᾱ s² + 1 - ᾱ)."""
    return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)


def mixture_eps(a, x):
    """E[ε | x_t] for x_0 ~ Σ_k W_k N(M_k, diag(S_k²)), ``a`` = ᾱ as [B, 1]: with v_k = ᾱ S_k² + 1 - ᾱ,
    responsibilities r_k ∝ W_k N(x_t; sqrt(ᾱ) M_k, v_k), per-component posterior means
    E[x_0 | x_t, k] = M_k + sqrt(ᾱ) S_k² / v_k (x_t - sqrt(ᾱ) M_k), and
    ε̂ = (x_t - sqrt(ᾱ) Σ_k r_k E[x_0 | x_t, k]) / sqrt(1 - ᾱ)."""
    ak = a[:, :, None]                                             # [B, 1, 1]
    v = ak * S**2 + 1 - ak                                         # [B, K, 2]
    diff = x[:, None, :] - ak.sqrt() * M
    r = torch.softmax(W.log() - 0.5 * (diff**2 / v + v.log()).sum(-1), dim=1)[..., None]
    x0 = (r * (M + ak.sqrt() * S**2 / v * diff)).sum(1)
    return (x - a.sqrt() * x0) / (1 - a).sqrt()


def gaussian_model(d, mu=MU, std=STD):
    """The optimal ε-predictor ``model(x, t)`` for x_0 ~ N(μ, diag(s²)) on the diffusion ``d``."""

    def model(x, t):
        a = d.alphas_cumprod[t].reshape(-1, *[1] * (x.ndim - 1))
        return gaussian_eps(a, x.double(), mu, std).to(x.dtype)

    return model


def mixture_model(d):
    """The optimal ε-predictor ``model(x, t)`` for the mixture (W, M, S), x of shape [B, 2]."""

    def model(x, t):
        return mixture_eps(d.alphas_cumprod[t][:, None], x.double()).to(x.dtype)

    return model


def mixture_moments():
    """Mean and covariance of the mixture."""
    mean = (W[:, None] * M).sum(0)
    second = sum(W[k] * (torch.diag(S[k] ** 2) + torch.outer(M[k], M[k])) for k in range(2))
    return mean, second - torch.outer(mean, mean)
