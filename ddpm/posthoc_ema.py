"""Post-hoc EMA (Karras et al. 2024, EDM2, sec. 3.2 and App. C.2): choose the averaging
length after training.

During training a few power-function EMAs (``ddpm.ema.PowerEMA``, exponents γ_k) are
tracked and snapshotted now and then. Every snapshot is a known weighting of the raw
weights θ_1 … θ_t: the power EMA of exponent γ after t steps weights θ_i by

    p_{t,γ}(i) = (i/t)^(γ+1) − ((i−1)/t)^(γ+1),   i = 1 … t   (``power_profile``),

the discrete form of EDM2's profile (γ+1) τ^γ / t^(γ+1) (eq. 121). Any other power EMA,
of exponent γ* at the last step T, is approximated by a linear combination Σ_j x_j θ̂_j of
the snapshots θ̂_j: x solves the least-squares problem  min_x ‖Σ_j x_j p_j − p_{T,γ*}‖²
(EDM2 App. C.2, Algorithm 3), i.e. the normal equations  A x = b  with
A_jk = ⟨p_j, p_k⟩ and b_j = ⟨p_j, p_{T,γ*}⟩. EDM2 evaluates these inner products in
closed form for the continuous profiles (eq. 151); here they are sums over the steps of the
discrete profiles, which is exact for the EMAs actually tracked (and agrees with eq. 151
when t is large). As in EDM2, x is finally scaled to sum to 1.

Snapshots are stored in float16 (as EDM2's are) and combined in float32.
"""

from collections.abc import Iterable

import torch

from ddpm.config.training import check_sigma_rel
from ddpm.ema import sigma_rel_to_gamma
from ddpm.errors import InputError

SNAPSHOT_DTYPE = torch.float16
_CHUNK = 1 << 16  # steps per block when summing inner products


def power_profile(step: int, gamma: float, length: int) -> torch.Tensor:
    """float64 [length]: entry i−1 is the weight of θ_i in the power EMA of exponent ``gamma``
    after ``step`` updates (zero for i > step); the entries sum to 1."""
    return _profile(step, gamma, 1, length)


def _profile(step: int, gamma: float, first: int, last: int) -> torch.Tensor:
    i = torch.arange(first, last + 1, dtype=torch.float64)
    w = (i.clamp(max=step) / step) ** (gamma + 1) - ((i - 1).clamp(max=step) / step) ** (gamma + 1)
    return w


def solve_coefficients(steps: list[int], gammas: list[float], out_step: int,
                       out_gamma: float) -> tuple[torch.Tensor, float]:
    """(x, fit error): the least-squares coefficients of the snapshots (taken after ``steps[j]``
    steps with exponent ``gammas[j]``) for the power EMA of exponent ``out_gamma`` after
    ``out_step`` steps, scaled to sum to 1, and the relative error ‖Σ x_j p_j − p*‖ / ‖p*‖
    of that fit."""
    if not steps or len(steps) != len(gammas):
        raise InputError("need at least one snapshot, with one exponent each")
    if any(not 0 < s <= out_step for s in steps):
        raise InputError(f"snapshot steps must lie in [1, {out_step}], got {sorted(steps)}")
    n = len(steps)
    A = torch.zeros(n, n, dtype=torch.float64)
    b = torch.zeros(n, dtype=torch.float64)
    tt = 0.0
    for first in range(1, out_step + 1, _CHUNK):
        last = min(first + _CHUNK - 1, out_step)
        P = torch.stack([_profile(s, g, first, last) for s, g in zip(steps, gammas)])  # [n, chunk]
        target = _profile(out_step, out_gamma, first, last)
        A += P @ P.T
        b += P @ target
        tt += float(target @ target)
    # the normal equations A x = b (EDM2 Algorithm 3); lstsq also copes with a singular A
    x = torch.linalg.lstsq(A, b[:, None], driver="gelsd").solution[:, 0]
    x = x / x.sum()
    residual = float(x @ A @ x - 2 * x @ b + tt)  # ‖P^T x − p*‖²
    return x, max(residual, 0.0) ** 0.5 / tt ** 0.5


def reconstruct(weighted: Iterable[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """Σ_j x_j θ̂_j over (state dict θ̂_j, coefficient x_j) pairs, summed in float32 as they come
    (one snapshot in memory at a time when ``weighted`` is a generator); non-float entries
    come from the last snapshot."""
    out = None
    for weights, x in weighted:
        if out is None:
            out = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in weights.items()}
        if weights.keys() != out.keys():
            raise InputError("the snapshots do not hold the same weights")
        for key, value in weights.items():
            if torch.is_floating_point(value):
                out[key] += float(x) * value.float()
            else:
                out[key] = value.clone()
    if out is None:
        raise InputError("no snapshots to reconstruct from")
    return out


def posthoc_ema(snapshots: list[dict[str, torch.Tensor]], steps: list[int], sigma_rels: list[float],
                out_step: int, sigma_rel: float) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
    """The weights of the power EMA of relative width ``sigma_rel`` after ``out_step`` steps,
    synthesised from snapshots (state dicts) of power EMAs of widths ``sigma_rels`` taken after
    ``steps``. Returns (weights, coefficients, fit error)."""
    x, error = solve(steps, sigma_rels, out_step, sigma_rel)
    return reconstruct(zip(snapshots, x.tolist())), x, error


def solve(steps: list[int], sigma_rels: list[float], out_step: int, sigma_rel: float) -> tuple[torch.Tensor, float]:
    """``solve_coefficients`` with widths σ_rel in place of exponents γ."""
    check_sigma_rel(sigma_rel)
    return solve_coefficients(steps, [sigma_rel_to_gamma(s) for s in sigma_rels], out_step,
                              sigma_rel_to_gamma(sigma_rel))


def snapshot(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as stored in a snapshot: on the CPU, floats in ``SNAPSHOT_DTYPE``."""
    return {k: v.detach().to("cpu", SNAPSHOT_DTYPE if torch.is_floating_point(v) else v.dtype)
            for k, v in weights.items()}
