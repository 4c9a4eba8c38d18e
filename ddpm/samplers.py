"""Samplers: one shared loop, one small step function per sampler.

The loop (``sample``) picks a subsequence of timesteps, respaces the diffusion onto
it (``ddpm.diffusion.respace``), draws x_T ~ N(0, I) and walks i = S-1 … 0. At each
step it calls the network with the *original* timestep ``timesteps[i]``, converts the
output to (x̂_0, ε̂) with ``ddpm.predictions.to_prediction`` (clipping x̂_0 as asked)
and hands that to the sampler's step function:

    step(x, i, pred, d, state, generator, **options) -> x_prev

where ``d`` is the respaced diffusion (index i ↔ original timestep ``timesteps[i]``)
and ``state`` is a dict the step may use to carry information between steps
(multistep solvers). ``state["denoise"](x, j)`` evaluates the network at respaced
index j and returns its ``Prediction``: samplers that need a second evaluation per
step (Heun) call it. All randomness comes from the explicit ``generator``.

Samplers (``SAMPLERS``):
- ``ddpm``          ancestral sampling (Ho et al. 2020, Algorithm 2)
- ``ddim``          DDIM with σ_t(η), or the DDIM paper's σ̂ (Song et al. 2021)
- ``dpm_solver++``  DPM-Solver++(2M), data prediction (Lu et al. 2022, Algorithm 2)
- ``euler``, ``heun`` the probability-flow ODE in σ = sqrt((1-ᾱ)/ᾱ) (Karras et al. 2022,
  Algorithm 1); Euler in this parameterisation is DDIM η = 0, Heun costs 2S-1 evaluations.

``ddim_invert`` runs DDIM η = 0 backwards, x_0 → x_T.

Class-conditional models (``labels`` given) are guided in that one place, ``denoise``, so
every sampler is (``ddpm.guidance``): at a guided step the conditional and the unconditional
(null-class) outputs come from one forward pass of the 2B-batch, both are converted to ε̂
(whatever the network predicts), ε̃ = (1 + w) ε̂_c − w ε̂_u, and only then is x̂_0 formed and
clipped. A learned variance is the conditional half's: guidance moves the mean only.

The loop runs under ``torch.inference_mode()`` with no host synchronisation: step
functions branch on Python values (i, options), never on tensor values.

Notation (the papers' symbols; ᾱ is Ho et al.'s alpha-bar, Song et al.'s α):
    d               the respaced diffusion (``ddpm.diffusion.Diffusion``), its index i ↔ ``timesteps[i]``
    i               the respaced index of the current step, counting down S-1 … 0
    x, x_prev       x_t and x_{t-1} (the sample before and after the step)
    pred.x0, .eps   x̂_0 and ε̂, the network's prediction at x_t
    a_t, a_prev     ᾱ_t and ᾱ_{t-1} (ᾱ_prev = 1 after the last step)
    sigma           DDIM: σ_t(η) (Song et al. 2021, eq. 16); Karras: σ = sqrt((1 - ᾱ) / ᾱ)
    sigma_next, s   Karras: σ at the next step; s = sqrt(ᾱ), the scale with x = s x̃
    h, D            DPM-Solver++: h_i = λ_{t_i} - λ_{t_{i-1}} with λ = log(α / σ); D_i the extrapolated x̂_0
    eta             η of DDIM (0: deterministic, 1: DDPM's posterior variance)
"""

import typing
from collections.abc import Callable
from dataclasses import fields
from typing import Literal, NamedTuple

import torch

from ddpm.acceleration import FastPath, inference_network, network, resolve
from ddpm.diffusion import Diffusion, extract, respace, timestep_subsequence
from ddpm.errors import InputError
from ddpm.config.fast_path import NETWORK_PRECISIONS
from ddpm.guidance import guided_eps
from ddpm.predictions import PREDICTIONS, Prediction, check_clip, to_prediction
from ddpm.config.sampling import SAMPLER_OPTIONS, DDIMOptions, DDPMOptions, Guidance
from ddpm.variance import fixed_log_variance_table

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _alphas(d: Diffusion, i: int, x: torch.Tensor):
    """ᾱ at respaced index i and at the index the step goes to (ᾱ_prev = 1 past the end), as [B, 1, …]."""
    t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
    return extract(d.alphas_cumprod, t, x.ndim), extract(d.alphas_cumprod_prev, t, x.ndim)


def ddpm_step(x, i, pred: Prediction, d: Diffusion, state, generator, variance: str = DDPMOptions.variance):
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
    log_var = fixed_log_variance_table(d, variance)
    # (3) x_{t-1} = μ̃ + σ_t z
    return mean + torch.exp(0.5 * extract(log_var, t, x.ndim)) * _noise_like(x, generator)


def ddim_step(x, i, pred: Prediction, d: Diffusion, state, generator, eta: float = DDIMOptions.eta,
              variance: str = DDIMOptions.variance):
    """DDIM step (Song et al. 2021, eq. 12) with σ_t(η) from eq. 16, or the paper's σ̂.

    x_{t-1} = sqrt(ᾱ_{t-1}) x̂_0 + sqrt(1 - ᾱ_{t-1} - σ_t²) ε̂ + σ_t z,
    σ_t = η sqrt((1 - ᾱ_{t-1}) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_{t-1}).

    ``variance="sigma_hat"``: σ̂_t = sqrt(1 - ᾱ_t / ᾱ_{t-1}), the "larger variance" row of
    the paper's Table 1. σ̂² exceeds 1 - ᾱ_{t-1} at large t, so eq. 12's square root would
    be imaginary; the paper's code (``ddpm_steps``) uses DDPM's posterior mean μ̃ with
    σ̂² (the respaced β) instead, which is ``ddpm_step`` with ``fixed_large``. η is unused.
    """
    if variance == "sigma_hat":
        if eta != 0:
            raise InputError(f"ddim: eta={eta} applies to variance='eta' only; σ̂ has no η")
        return ddpm_step(x, i, pred, d, state, generator, variance="fixed_large")
    if variance != "eta":
        raise InputError(f"unknown variance {variance!r}; choose eta or sigma_hat")
    a_t, a_prev = _alphas(d, i, x)
    # (1) σ_t(η), eq. 16
    sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t)) * torch.sqrt(1 - a_t / a_prev)
    # (2) "predicted x_0" plus "direction pointing to x_t", eq. 12
    x_prev = a_prev.sqrt() * pred.x0 + torch.sqrt((1 - a_prev - sigma**2).clamp(min=0)) * pred.eps
    # (3) "random noise" σ_t z (none at the last step)
    if eta > 0 and i > 0:
        x_prev = x_prev + sigma * _noise_like(x, generator)
    return x_prev


def _half_log_snr(a: torch.Tensor) -> torch.Tensor:
    """λ = log(α / σ) with α = sqrt(ᾱ), σ = sqrt(1 - ᾱ); +inf at ᾱ = 1."""
    return 0.5 * (torch.log(a) - torch.log1p(-a))


def dpm_solver_pp_step(x, i, pred: Prediction, d: Diffusion, state, generator):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), data-prediction form.

    With α_t = sqrt(ᾱ_t), σ_t = sqrt(1 - ᾱ_t), λ_t = log(α_t / σ_t), going from t_{i-1} to t_i
    (the papers count the solver's steps upwards from x_T; ``i`` here counts down):
      h_i = λ_{t_i} - λ_{t_{i-1}},  r_i = h_{i-1} / h_i,
      D_i = (1 + 1/(2 r_i)) x̂_0(t_{i-1}) - 1/(2 r_i) x̂_0(t_{i-2}),
      x_{t_i} = (σ_{t_i} / σ_{t_{i-1}}) x_{t_{i-1}} - α_{t_i} (e^{-h_i} - 1) D_i.
    The first step has no previous x̂_0 and is first order (D = x̂_0), which is DDIM η = 0.
    The last two steps are first order too, diffusers' ``lower_order_final`` on this grid: the
    final step (to ᾱ = 1, h = ∞) returns x̂_0, and the one before lands on t_0, which for the
    usual grids is timestep 0 (σ ≈ 0.01), i.e. the end of the ODE; diffusers' grids stop short
    of it and step from there to σ = 0 with first order. Taking this long λ-interval with
    second order extrapolates x̂_0 far and overshoots (on the Gaussian tests: a data std 12%
    too large at 20 linspace steps). ``state`` carries the previous x̂_0 and h.
    """
    a_t, a_prev = _alphas(d, i, x)
    # (1) h_i = λ_{t_i} - λ_{t_{i-1}}, from the current noise level to the next (lower) one
    h = _half_log_snr(a_prev) - _half_log_snr(a_t)
    # (2) D_i: second order from the last two data predictions; first order at the ends (i ≤ 1)
    D = pred.x0
    if "x0" in state and i > 1:
        r = state["h"] / h
        D = (1 + 1 / (2 * r)) * pred.x0 - (1 / (2 * r)) * state["x0"]
    state["x0"], state["h"] = pred.x0, h
    # (3) x_{t_i} = (σ_{t_i}/σ_{t_{i-1}}) x - α_{t_i} (e^{-h_i} - 1) D_i; at the end σ = 0, e^{-h} = 0
    return torch.sqrt((1 - a_prev) / (1 - a_t)) * x - a_prev.sqrt() * torch.expm1(-h) * D


def _karras_sigmas(d: Diffusion, i: int, x: torch.Tensor):
    """σ = sqrt((1 - ᾱ) / ᾱ) now and at the next step, and the scales sqrt(ᾱ) to leave x̃ = x / sqrt(ᾱ)."""
    a_t, a_prev = _alphas(d, i, x)
    return torch.sqrt((1 - a_t) / a_t), torch.sqrt((1 - a_prev) / a_prev), a_t.sqrt(), a_prev.sqrt()


def euler_step(x, i, pred: Prediction, d: Diffusion, state, generator):
    """Euler on the probability-flow ODE (Karras et al. 2022, eq. 4 and Algorithm 1 without line 8).

    In x̃ = x / sqrt(ᾱ) and σ = sqrt((1 - ᾱ)/ᾱ) the ODE is dx̃/dσ = (x̃ - D(x̃; σ)) / σ = ε̂.
    One Euler step x̃' = x̃ + (σ' - σ) ε̂ is exactly DDIM with η = 0 (Song et al. 2021, eq. 13).
    """
    sigma, sigma_next, s, s_next = _karras_sigmas(d, i, x)
    # (1) d_i = (x̃ - D) / σ = ε̂;  (2) x̃_{i+1} = x̃_i + (σ_{i+1} - σ_i) d_i, mapped back to x
    return s_next * (x / s + (sigma_next - sigma) * pred.eps)


def heun_step(x, i, pred: Prediction, d: Diffusion, state, generator):
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1).

    Evaluates the network a second time at the Euler point (through ``state["denoise"]``)
    and averages the two slopes; the last step, to σ = 0, is plain Euler (Algorithm 1,
    line 8's "if σ_{i+1} ≠ 0"). So is the first step, from σ_T: with ᾱ_T ≈ 0 (the cosine
    schedule gives σ_T ≈ 2·10⁴) that step spans orders of magnitude of σ, and the
    trapezoid over it is unstable, while the Euler (= DDIM) step from pure noise is not.
    S ≥ 2 steps cost 2S - 2 network evaluations.
    """
    x_euler = euler_step(x, i, pred, d, state, generator)
    if i == 0 or i == d.num_timesteps - 1:
        return x_euler
    sigma, sigma_next, s, s_next = _karras_sigmas(d, i, x)
    # (1) d'_i = ε̂ at (x̃_{i+1}, σ_{i+1})  (2) x̃_{i+1} = x̃_i + (σ_{i+1} - σ_i)(d_i + d'_i) / 2
    eps_next = state["denoise"](x_euler, i - 1).eps
    return s_next * (x / s + (sigma_next - sigma) * 0.5 * (pred.eps + eps_next))


class Sampler(NamedTuple):
    step: Callable  # step(x, i, pred, d, state, generator, **options) -> x_prev
    options: type  # the dataclass of its options (keyword arguments of ``step``)


_STEPS = {"ddpm": ddpm_step, "ddim": ddim_step, "dpm_solver++": dpm_solver_pp_step, "euler": euler_step,
          "heun": heun_step}
SAMPLERS: dict[str, Sampler] = {kind: Sampler(_STEPS[kind], options) for kind, options in SAMPLER_OPTIONS.items()}


def check_options(sampler: str, options: dict | None) -> Callable:
    """The step function of ``sampler`` once its options are known to fit; a clear error otherwise."""
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    step_fn, options_type = SAMPLERS[sampler]
    allowed = [f.name for f in fields(options_type)]
    hints = typing.get_type_hints(options_type)
    for key, value in (options or {}).items():
        if key not in allowed:
            raise InputError(f"sampler {sampler!r} has no option {key!r} "
                             f"(options: {', '.join(allowed) or 'none'})")
        choices = typing.get_args(hints[key])
        if typing.get_origin(hints[key]) is Literal and value not in choices:
            raise InputError(f"{sampler}: {key}={value!r} is not one of {', '.join(choices)}")
    options_type(**(options or {}))  # the options' own checks
    return step_fn


def _network(model: Denoiser, precision: str, device) -> Denoiser:
    """The network as this call of the loop runs it: a module with floating-point weights in bf16 on
    a copy of its weights cast once (``ddpm.acceleration.inference_network``); any other callable
    under bf16 autocast (``ddpm.acceleration.network``); as it is for fp32."""
    weights = [p for p in model.parameters() if p.is_floating_point()] if isinstance(model, torch.nn.Module) else []
    if precision == "bf16" and weights:
        return inference_network(model, FastPath("bf16", "contiguous", "none"))[1]
    return network(model, precision, device)


def _denoiser(model: Denoiser, d: Diffusion, timesteps: list[int], prediction: str, clip: str,
              percentile: float, precision: str, variance: str = "fixed_small", labels: torch.Tensor | None = None,
              null_label: int | None = None, guidance: Guidance | None = None) -> Callable[[torch.Tensor, int], Prediction]:
    """``denoise(x, i)``: the network at respaced index i (original timestep ``timesteps[i]``) as a
    Prediction. The network runs through ``ddpm.acceleration.network`` (bf16: autocast, on CUDA or
    CPU), its output cast back to x's dtype, so x̂_0, its clipping and the steps see no bf16 tensor.
    With ``labels`` the network is called as ``model(x, t, labels)`` and guided (module docstring)."""
    for key, value, allowed in (("prediction", prediction, PREDICTIONS), ("precision", precision, NETWORK_PRECISIONS)):
        if value not in allowed:
            raise InputError(f"unknown {key} {value!r}; choose one of {', '.join(allowed)}")
    check_clip(clip, percentile)
    guidance = (guidance or Guidance()).check()
    if labels is None and guidance.w != 0:
        raise InputError("classifier-free guidance needs labels (a class-conditional model)")
    if labels is not None and guidance.w != 0 and null_label is None:
        raise InputError("classifier-free guidance needs the null label (the model's num_classes)")
    t_orig = torch.tensor(timesteps, device=d.device, dtype=torch.long)
    forward = _network(model, resolve(d.device, precision, role="inference").precision, d.device)
    # which respaced steps are guided: decided once, on the host, from σ = sqrt((1 - ᾱ) / ᾱ)
    sigmas = ((1 - d.alphas_cumprod) / d.alphas_cumprod).sqrt().tolist() if guidance.w != 0 else []
    guided = [guidance.active(sigma) for sigma in sigmas]

    def net(x: torch.Tensor, idx: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        out = forward(x, t_orig[idx]) if y is None else forward(x, t_orig[idx], y)
        return out.to(x.dtype)

    def denoise(x: torch.Tensor, i: int) -> Prediction:
        idx = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        if not (guided and guided[i]):
            return to_prediction(d, prediction, net(x, idx, labels), x, idx, clip=clip, percentile=percentile,
                                 variance=variance)
        # (1) conditional and unconditional outputs from one forward pass of [x; x] with [y; ∅]
        y = torch.cat([labels, torch.full_like(labels, null_label)])
        out_c, out_u = net(torch.cat([x, x]), torch.cat([idx, idx]), y).chunk(2)
        # (2) both as ε̂, whatever the network predicts (unclipped)
        cond = to_prediction(d, prediction, out_c, x, idx, variance=variance)
        uncond = to_prediction(d, prediction, out_u, x, idx, variance=variance)
        # (3) ε̃ = (1 + w) ε̂_c − w ε̂_u (rescaled when asked); then x̂_0 from ε̃, clipped as asked
        eps = guided_eps(cond.eps, uncond.eps, guidance.w, guidance.rescale)
        pred = to_prediction(d, "eps", eps, x, idx, clip=clip, percentile=percentile)
        # (4) a learned variance is the conditional model's: guidance moves the mean only
        pred.log_variance = cond.log_variance
        return pred

    return denoise


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
    clip: str = "static",
    percentile: float = 99.5,
    precision: str = "fp32",
    generator: torch.Generator | None = None,
    options: dict | None = None,
    progress: Callable[[int], None] | None = None,
    x_T: torch.Tensor | None = None,
    on_step: Callable[[int, torch.Tensor, Prediction], None] | None = None,
    labels: torch.Tensor | None = None,
    null_label: int | None = None,
    guidance: Guidance | None = None,
) -> torch.Tensor:
    """Generate a batch of shape ``shape`` in [-1, 1] (not clamped) with ``sampler``.

    ``model(x, t)`` is called with the original timesteps. ``steps`` defaults to T.
    ``variance`` is the model's (``ModelSpec.variance``): with ``learned`` the network's
    log-variance, on the respaced β and β̃, goes to the step function in ``pred.log_variance``.
    ``clip``: static | dynamic | none, what happens to x̂_0 (``percentile`` for dynamic).
    ``precision``: auto | fp32 | bf16, of the network (bf16, on CUDA or CPU: a module's weights cast
    once to bfloat16 for this call, any other callable under autocast; auto: bf16 on CUDA, fp32 on
    CPU); x and every step's arithmetic keep x's dtype (float32, or float64). A denoiser from
    ``ddpm.acceleration.make_denoiser`` brings its own precision: leave this at fp32.
    ``options`` go to the step function (e.g. ``eta`` for ddim, ``variance`` for ddpm).
    ``progress``, when given, is called with 1 after every step. ``on_step(t, x_prev, pred)``,
    when given, sees every step's result (original timestep t), e.g. for denoising strips.
    ``labels`` (int64 [B]) condition a class-conditional model, called as ``model(x, t, labels)``;
    ``guidance`` (``ddpm.guidance.Guidance``) guides it, with ``null_label`` as the unconditional label.
    """
    step_fn = check_options(sampler, options)
    if labels is not None and labels.shape != (shape[0],):
        raise ValueError(f"labels must have shape [{shape[0]}], got {list(labels.shape)}")
    timesteps = timestep_subsequence(diffusion.num_timesteps, steps or diffusion.num_timesteps, spacing)
    d = respace(diffusion, timesteps)
    labels = None if labels is None else labels.to(diffusion.device)
    denoise = _denoiser(model, d, timesteps, prediction, clip, percentile, precision, variance, labels, null_label,
                        guidance)
    device = diffusion.device
    x = _noise_like(torch.empty(shape, device=device), generator) if x_T is None else x_T.to(device)
    state: dict = {"denoise": denoise}
    with torch.inference_mode():
        for i in reversed(range(len(timesteps))):
            pred = denoise(x, i)
            x = step_fn(x, i, pred, d, state, generator, **(options or {}))
            if on_step is not None:
                on_step(timesteps[i], x, pred)
            if progress is not None:
                progress(1)
    return x


def ddim_invert(model: Denoiser, diffusion: Diffusion, x0: torch.Tensor, steps: int | None = None, *,
                spacing: str = "linspace", prediction: str = "eps", variance: str = "fixed_small",
                precision: str = "fp32", progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """DDIM inversion x_0 → x_T: eq. 12 with η = 0 run from t_{i-1} up to t_i (Song et al. 2021,
    sec. 4.3; Dhariwal & Nichol 2021, App. F). ε̂ is taken at the current, less noisy point
    (ε̂(x_{t_i}) ≈ ε̂(x_{t_{i-1}})), the approximation that makes the round trip inexact by
    O(step size); x̂_0 is not clipped. Feed the result to ``sample(..., sampler="ddim",
    x_T=…)`` with the same ``steps`` and ``spacing`` to reconstruct x_0.
    """
    timesteps = timestep_subsequence(diffusion.num_timesteps, steps or diffusion.num_timesteps, spacing)
    d = respace(diffusion, timesteps)
    denoise = _denoiser(model, d, timesteps, prediction, "none", 99.5, precision, variance)
    x = x0.to(diffusion.device)
    with torch.inference_mode():
        for i in range(len(timesteps)):
            a_next, a_cur = _alphas(d, i, x)  # ᾱ at t_i (target) and at t_{i-1} (current; 1 for x_0)
            # (1) ε̂ at the current point; x_0 itself is fed at the first timestep
            eps = denoise(x, max(i - 1, 0)).eps
            # (2) x̂_0 from the current point (x_0 itself when ᾱ = 1)
            x0_hat = (x - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
            # (3) x_{t_i} = sqrt(ᾱ_{t_i}) x̂_0 + sqrt(1 - ᾱ_{t_i}) ε̂, eq. 12 with σ = 0
            x = a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps
            if progress is not None:
                progress(1)
    return x
