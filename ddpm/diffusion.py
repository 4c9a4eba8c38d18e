"""The Gaussian diffusion process: precomputed tables, q(x_t | x_0), the posterior
q(x_{t-1} | x_t, x_0), and conversions between x_0, ε and v.

Timestep convention (used everywhere in this package): a timestep is an integer
index t ∈ {0, …, T-1}, and ``table[t]`` holds the paper's quantity at step t+1.
So ``alphas_cumprod[0] = ᾱ_1 = 1 - β_1`` and ``x_t`` with index t is the paper's
x_{t+1}; the model is called with the index t. ``alphas_cumprod_prev[t]`` is
ᾱ_t in paper terms (1 for t = 0). This is improved-diffusion's convention.

All tables are computed in float64 from the betas and cast once, to ``dtype`` on
``device``, when the ``Diffusion`` is built.

Equations (Ho et al. 2020):
  (4)  q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I)
  (6)  q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I)
  (7)  μ̃_t = sqrt(ᾱ_{t-1}) β_t / (1 - ᾱ_t) · x_0 + sqrt(α_t) (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · x_t
       β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · β_t
v-parameterisation (Salimans & Ho 2022): v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0.
"""

from dataclasses import dataclass

import torch

from ddpm.config.sampling import SPACINGS
from ddpm.errors import InputError
from ddpm.schedules import make_betas


def extract(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather ``table[t]`` and reshape to [B, 1, …, 1] for broadcasting over ``ndim`` dims."""
    out = table.gather(0, t.to(table.device))
    return out.reshape(t.shape[0], *([1] * (ndim - 1)))


@dataclass(frozen=True)
class Diffusion:
    """Precomputed diffusion tables, each of shape [T] (see module docstring)."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    betas64: torch.Tensor  # the float64 source, on the CPU, kept for respacing

    @classmethod
    def from_betas(cls, betas: torch.Tensor, device="cpu", dtype=torch.float32) -> "Diffusion":
        b = betas.detach().to("cpu", torch.float64)
        if b.ndim != 1 or not bool(((b > 0) & (b <= 1)).all()):
            raise InputError("betas must be a 1-D tensor with values in (0, 1]")
        alphas = 1.0 - b
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        # β̃_1 = 0: clip the log at t=0 with β̃_2 (improved-diffusion).
        post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]])) if len(b) > 1 else torch.log(b)
        tables = dict(
            betas=b,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=ac.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - ac).sqrt(),
            sqrt_recip_alphas_cumprod=(1.0 / ac).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / ac - 1.0).sqrt(),
            posterior_variance=post_var,
            posterior_log_variance_clipped=post_log_var,
            posterior_mean_coef1=b * ac_prev.sqrt() / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
        )
        cast = {k: v.to(device=device, dtype=dtype) for k, v in tables.items()}
        return cls(**cast, betas64=b)

    @classmethod
    def from_schedule(cls, schedule: str, num_timesteps: int, device="cpu", dtype=torch.float32) -> "Diffusion":
        return cls.from_betas(make_betas(schedule, num_timesteps), device, dtype)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def device(self) -> torch.device:
        return self.betas.device


# ---------------------------------------------------------------- forward process
def q_mean_variance(d: Diffusion, x0: torch.Tensor, t: torch.Tensor):
    """Mean, variance and log-variance of q(x_t | x_0), eq. (4)."""
    mean = extract(d.sqrt_alphas_cumprod, t, x0.ndim) * x0
    var = extract(1.0 - d.alphas_cumprod, t, x0.ndim)
    return mean, var, torch.log(var)


def q_sample(d: Diffusion, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0) = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, eq. (4)."""
    return (extract(d.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + extract(d.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_posterior_mean_variance(d: Diffusion, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
    """μ̃_t(x_t, x_0), β̃_t and log β̃_t (clipped) of q(x_{t-1} | x_t, x_0), eqs. (6)-(7)."""
    mean = (extract(d.posterior_mean_coef1, t, xt.ndim) * x0
            + extract(d.posterior_mean_coef2, t, xt.ndim) * xt)
    var = extract(d.posterior_variance, t, xt.ndim)
    log_var = extract(d.posterior_log_variance_clipped, t, xt.ndim)
    return mean, var, log_var


# ---------------------------------------------------------------- conversions
def x0_from_eps(d: Diffusion, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)  (eq. 4 solved for x_0)."""
    return (extract(d.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt
            - extract(d.sqrt_recipm1_alphas_cumprod, t, xt.ndim) * eps)


def eps_from_x0(d: Diffusion, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """ε = (x_t / sqrt(ᾱ_t) - x_0) / sqrt(1/ᾱ_t - 1)."""
    return ((extract(d.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt - x0)
            / extract(d.sqrt_recipm1_alphas_cumprod, t, xt.ndim))


def v_from_x0_eps(d: Diffusion, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho 2022, sec. 4)."""
    return (extract(d.sqrt_alphas_cumprod, t, x0.ndim) * eps
            - extract(d.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def x0_from_v(d: Diffusion, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x_0 = sqrt(ᾱ_t) x_t - sqrt(1 - ᾱ_t) v."""
    return (extract(d.sqrt_alphas_cumprod, t, xt.ndim) * xt
            - extract(d.sqrt_one_minus_alphas_cumprod, t, xt.ndim) * v)


def x0_from_posterior_mean(d: Diffusion, xt: torch.Tensor, t: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Invert eq. (7): x_0 = (μ̃ - coef2 · x_t) / coef1."""
    return ((mean - extract(d.posterior_mean_coef2, t, xt.ndim) * xt)
            / extract(d.posterior_mean_coef1, t, xt.ndim))


# ---------------------------------------------------------------- respacing


def timestep_subsequence(num_timesteps: int, steps: int, spacing: str = "linspace") -> list[int]:
    """An increasing subsequence of ``steps`` timesteps out of {0, …, T-1}.

    - ``linspace``  evenly spaced, both ends included (round(linspace(0, T-1, S)))
    - ``leading``   0, T/S, 2T/S, … (DDIM code's "uniform"; the last step < T-1)
    - ``trailing``  T-1, T-1-T/S, … counted down from the end
    - ``quadratic`` (linspace(0, sqrt(0.8 T), S))², the DDIM paper's CIFAR-10 choice
    """
    T, S = num_timesteps, steps
    if not 1 <= S <= T:
        raise InputError(f"steps must be in [1, {T}], got {S}")
    if spacing == "linspace":
        ts = torch.linspace(0, T - 1, S, dtype=torch.float64).round().long().tolist()
    elif spacing == "leading":
        ts = [int(i * T / S) for i in range(S)]
    elif spacing == "trailing":
        ts = sorted(int(round(T - i * T / S)) - 1 for i in range(S))
    elif spacing == "quadratic":
        ts = (torch.linspace(0, (0.8 * T) ** 0.5, S, dtype=torch.float64) ** 2).round().long().tolist()
    else:
        raise InputError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    # Rounding can collide near 0 (quadratic) — push collisions forward, keep within [0, T-1].
    out = []
    for i, t in enumerate(sorted(ts)):
        t = max(t, out[-1] + 1 if out else 0)
        out.append(min(t, T - S + i))
    return out


def respace(d: Diffusion, timesteps: list[int]) -> Diffusion:
    """The diffusion restricted to ``timesteps`` (improved-diffusion's respacing).

    New betas β'_i = 1 - ᾱ_{s_i} / ᾱ_{s_{i-1}} (ᾱ_{s_{-1}} = 1), computed in float64, so
    that the respaced process has exactly the marginals q(x_{s_i} | x_0) of the original.
    Index i of the result corresponds to original timestep ``timesteps[i]``.
    """
    ac = torch.cumprod(1.0 - d.betas64, 0)[torch.tensor(timesteps)]
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    return Diffusion.from_betas(1.0 - ac / prev, device=d.device, dtype=d.betas.dtype)
