"""Exponential moving averages of the weights, as update rules for
``torch.optim.swa_utils.AveragedModel``.

After the n-th optimiser step the average becomes  θ̂_n = β_n θ̂_{n-1} + (1 − β_n) θ_n,
with β_1 = 0 (``AveragedModel`` copies the weights at its first update). ``kind`` names
the rule for β_n:

- ``power``  the power-function EMA of Karras et al. 2024 (EDM2, sec. 3.1, App. C.1):
             β_n = (1 − 1/n)^(γ+1)  (eq. 127 with t in steps). After t steps it weights
             θ_i by ((i/t)^(γ+1) − ((i−1)/t)^(γ+1)), i = 1..t — the discrete form of the
             profile (γ+1) τ^γ / t^(γ+1) — so it averages only what exists: no warm-up,
             no bias towards the initial weights. Its width is relative to the training
             length: σ_rel, the profile's standard deviation over its length, with γ the
             largest root of the cubic of EDM2 eq. 126 / Algorithm 2 (``sigma_rel_to_gamma``).
- ``warmup`` the decay ramp of diffusers' ``EMAModel`` with ``use_ema_warmup`` (and of
             ema-pytorch; due to K. Crowson): β_n = min(decay, 1 − (1 + (n−1)/inv_gamma)^(−power)).
- ``fixed``  a constant β_n = decay from the first update (Ho et al. 2020 use 0.9999).
             Over a run much shorter than 1/(1 − decay) steps it still holds much of the
             weights of the first steps.

β is computed in float64 and applied in the weights' dtype. ``AveragedModel.update_parameters``
(the rule as a ``multi_avg_fn``) reads its update count on the host (``n_averaged == 0``, a device
sync on CUDA: pytorch/pytorch#157705) and walks the parameters in Python, per average.
``Averages``, what training uses, updates every average of one model at once: β of each from a
count kept on the host (read once), then one multi-tensor lerp over all of them per dtype group
and one multi-tensor add of the counts, with no host synchronisation. The result is
``AveragedModel.update_parameters``'s, bit for bit (``tests/test_fast_path.py``).
"""

import functools

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from ddpm.config.training import EMA_CHOICES, EMAConfig, FixedEMA, PowerEMA, WarmupEMA, check_sigma_rel
from ddpm.errors import InputError

@functools.lru_cache(maxsize=64)
def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """γ of the power-function EMA of relative width σ_rel: the largest real root of
    γ³ + 7γ² + (16 − σ_rel⁻²) γ + (12 − σ_rel⁻²) = 0 (EDM2 eq. 126, Algorithm 2)."""
    check_sigma_rel(sigma_rel)
    s = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def decay(cfg: EMAConfig, n_averaged: torch.Tensor) -> torch.Tensor:
    """β of the update that follows ``n_averaged`` ≥ 1 earlier ones (float64, on their device)."""
    n = n_averaged.to(torch.float64)
    if isinstance(cfg, PowerEMA):
        # (1 − 1/t)^(γ+1) with t = n + 1, the steps averaged after this update
        return (n / (n + 1)) ** (sigma_rel_to_gamma(cfg.sigma_rel) + 1)
    if isinstance(cfg, WarmupEMA):
        # diffusers' get_decay(step = n + 1): 1 − (1 + (step − 1) / inv_gamma)^(−power), at most decay
        return (1 - (1 + n / cfg.inv_gamma) ** -cfg.power).clamp(max=cfg.decay)
    if isinstance(cfg, FixedEMA):
        return torch.full_like(n, cfg.decay)
    raise InputError(f"unknown EMA {cfg!r}; choose one of {', '.join(c.__name__ for c in EMA_CHOICES)}")


def multi_avg_fn(cfg: EMAConfig):
    """The ``multi_avg_fn`` of ``AveragedModel`` for ``cfg``."""
    if isinstance(cfg, PowerEMA):
        sigma_rel_to_gamma(cfg.sigma_rel)  # fail now, not at the second step

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        beta = decay(cfg, n_averaged)
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, (1 - beta).to(averaged[0].dtype))
        else:  # integer buffers: keep the latest
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    return update


def averaged_model(model: torch.nn.Module, cfg: EMAConfig) -> AveragedModel:
    """An ``AveragedModel`` of ``model`` (parameters and buffers) following ``cfg``."""
    return AveragedModel(model, multi_avg_fn=multi_avg_fn(cfg), use_buffers=True)


class Averages:
    """Every average of one model's weights, updated together after each optimiser step.

    ``pairs`` are (``AveragedModel`` of ``model``, its ``EMAConfig``): the training EMA and the
    post-hoc profiles. Each update is, per dtype group, one ``torch._foreach_lerp_`` over all the
    averages' tensors (each with its own weight 1 − β), and one ``torch._foreach_add_`` of their
    ``n_averaged`` counts: no host synchronisation, a fixed handful of kernel launches however
    many averages there are. β follows ``decay`` from a copy of each count kept on the host (read
    once, here); β = 0 for the first update, which copies the weights as ``AveragedModel`` does.
    """

    def __init__(self, model: torch.nn.Module, pairs: list[tuple[AveragedModel, "EMAConfig"]],
                 counts: list[int] | None = None):
        for _, cfg in pairs:
            if isinstance(cfg, PowerEMA):
                sigma_rel_to_gamma(cfg.sigma_rel)  # fail now, not at the second step
        self.configs = [cfg for _, cfg in pairs]
        # the update counts: given, or read once (one host sync per training run, not per step)
        self.counts = list(counts) if counts is not None else [int(avg.n_averaged) for avg, _ in pairs]
        self.n_averaged = [avg.n_averaged for avg, _ in pairs]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        # per dtype: (averaged tensors, model tensors, index of the average each belongs to)
        self.groups: dict[torch.dtype, tuple[list, list, list]] = {}
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # integer buffers: keep the latest
        for k, (avg, _) in enumerate(pairs):
            mine = [t.detach() for t in (*avg.module.parameters(), *avg.module.buffers())]
            if len(mine) != len(current):
                raise InputError(f"average {k} holds {len(mine)} tensors, the model {len(current)}")
            for a, c in zip(mine, current):
                if torch.is_floating_point(a):
                    group = self.groups.setdefault(a.dtype, ([], [], []))
                    group[0].append(a), group[1].append(c), group[2].append(k)
                else:
                    self.copies.append((a, c))
        # per average and dtype: (averaged tensors, model tensors), for update_on_device
        self.by_average: list[dict[torch.dtype, tuple[list, list]]] = [{} for _ in pairs]
        for dtype, (averaged, current, owner) in self.groups.items():
            for a, c, k in zip(averaged, current, owner):
                mine = self.by_average[k].setdefault(dtype, ([], []))
                mine[0].append(a), mine[1].append(c)

    def weights(self) -> list[float]:
        """1 − β of the next update of each average, in float64 on the host (``decay`` on a CPU tensor)."""
        return [1.0 - (0.0 if n == 0 else decay(cfg, torch.tensor(n)).item()) for cfg, n in zip(self.configs, self.counts)]

    @torch.no_grad()
    def update(self) -> None:
        w = torch.tensor(self.weights(), dtype=torch.float64)
        for dtype, (averaged, current, owner) in self.groups.items():
            # each weight rounded to the tensors' dtype first, as AveragedModel's rule applies it
            rounded = w.to(dtype).tolist()
            torch._foreach_lerp_(averaged, current, [rounded[k] for k in owner])
        for a, c in self.copies:
            a.copy_(c)
        if self.n_averaged:
            torch._foreach_add_(self.n_averaged, 1)
        self.counts = [n + 1 for n in self.counts]

    @torch.no_grad()
    def update_on_device(self) -> None:
        """The same update with β computed on the device from each average's ``n_averaged`` (``decay``,
        float64; 0 at the first update) and applied as θ̂ ← β θ̂ + (1 − β) θ: no host value at all, so
        it can be captured in a CUDA graph and replayed (the host counts are not kept: ``resync``).
        Equal to ``update`` up to float rounding (a product and a sum instead of a lerp)."""
        for k, cfg in enumerate(self.configs):
            n = self.n_averaged[k]
            beta = torch.where(n == 0, torch.zeros((), dtype=torch.float64, device=n.device), decay(cfg, n))
            for dtype, (averaged, current) in self.by_average[k].items():
                b = beta.to(dtype)
                torch._foreach_mul_(averaged, b)
                torch._foreach_add_(averaged, torch._foreach_mul(current, 1 - b))
        for a, c in self.copies:
            a.copy_(c)
        if self.n_averaged:
            torch._foreach_add_(self.n_averaged, 1)

    def resync(self) -> None:
        """Read the update counts back from the averages (after ``update_on_device``: one host sync)."""
        self.counts = [int(n) for n in self.n_averaged]


def averaged_weights(averaged: AveragedModel) -> dict[str, torch.Tensor]:
    """The averaged network's own state dict (``AveragedModel``'s ``module.*`` entries)."""
    return {k.removeprefix("module."): v for k, v in averaged.state_dict().items() if k.startswith("module.")}
