import math

import pytest
import torch

from ddpm.schedules import SCHEDULES, make_betas


def test_linear_matches_ho_et_al():
    b = make_betas("linear", 1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    assert torch.all(b[1:] > b[:-1])


def test_cosine_alphas_cumprod_closed_form():
    T, s = 1000, 0.008
    b = make_betas("cosine", T)
    ac = torch.cumprod(1 - b, 0)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 10, 500, 900):  # paper's t ↔ index t-1; before the 0.999 clip bites
        assert ac[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert b.max().item() <= 0.999


@pytest.mark.parametrize("name", SCHEDULES)
def test_all_schedules_valid(name):
    for T in (10, 1000, 4000):
        b = make_betas(name, T)
        assert b.dtype == torch.float64 and b.shape == (T,)
        assert torch.all((b > 0) & (b <= 0.999))
        # the chain ends close to pure noise
        assert torch.cumprod(1 - b, 0)[-1].item() < 0.01


def test_unknown_schedule_names_choices():
    with pytest.raises(ValueError, match="linear, cosine"):
        make_betas("exponential", 10)
