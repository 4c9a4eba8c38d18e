"""The named choices of the diffusion model and its objective, and which of them combine.

  schedule           ``ddpm.schedules``: the β schedule
  prediction         ``ddpm.predictions``: what the network outputs
  variance           ``ddpm.variance``: σ_t² of p_θ(x_{t-1} | x_t)
  loss               ``ddpm.objectives``: L_simple, the bound, or both
  timestep_sampling  ``ddpm.timestep_sampling``: how training draws t
  conditioning       ``ddpm.guidance``: what the network sees besides x_t and t
"""

from ddpm.errors import InputError

SCHEDULES = ("linear", "cosine", "quadratic", "sigmoid")
PREDICTIONS = ("eps", "x0", "v", "mean")
VARIANCES = ("fixed_small", "fixed_large", "learned")
LOSSES = ("simple", "vlb", "hybrid")
TIMESTEP_SAMPLINGS = ("uniform", "importance")
CONDITIONINGS = ("none", "class")


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """``InputError`` naming the key and the choices unless ``value`` is one of them."""
    if value not in choices:
        raise InputError(f"unknown {key} {value!r}; choose one of {', '.join(choices)}")


def check_objective(loss: str, variance: str, timestep_sampling: str = "uniform") -> None:
    """Reject unknown names and combinations where part of the model would not be trained."""
    check_choice("loss", loss, LOSSES)
    check_choice("variance", variance, VARIANCES)
    check_choice("timestep_sampling", timestep_sampling, TIMESTEP_SAMPLINGS)
    if variance == "learned" and loss == "simple":
        raise InputError("variance=learned with loss=simple: L_simple does not depend on the variance, so "
                         "nothing would train it; use loss=hybrid (Nichol & Dhariwal) or loss=vlb")
    if loss == "hybrid" and variance != "learned":
        raise InputError(f"loss=hybrid with variance={variance}: the bound's mean is stop-gradiented, so with a "
                         "fixed variance its term trains nothing and hybrid equals simple; use variance=learned, "
                         "or loss=simple / loss=vlb")
    if timestep_sampling == "importance" and loss == "simple":
        raise InputError("timestep_sampling=importance with loss=simple: importance sampling weights t by the "
                         "bound's terms L_t (Nichol & Dhariwal sec. 3.3), which loss=simple does not compute; "
                         "use loss=vlb or loss=hybrid, or timestep_sampling=uniform")
