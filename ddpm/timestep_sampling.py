"""How training draws the timestep t of each example.

``timestep_sampling`` names the choice:
- ``uniform``     t ~ Uniform{0, …, T-1} (Ho et al. 2020, Algorithm 1)
- ``importance``  loss-aware importance sampling (Nichol & Dhariwal 2021, sec. 3.3, eq. 18):
                  L_vlb = E_{t~p_t}[L_t / p_t],  p_t ∝ sqrt(E[L_t²]),  Σ p_t = 1,
                  with E[L_t²] estimated from the 10 most recent values of L_t for each t,
                  and t drawn uniformly until every t has 10 values. As in improved-diffusion
                  a small uniform share (1e-3) is mixed into p_t so no t starves.

A sampler's ``sample`` returns (t, weights); the per-example loss is multiplied by the
weights 1 / (T p_t), which keeps the objective an unbiased estimate of the uniform-t one
(weights is None for ``uniform``: nothing to multiply). Everything stays on the device:
no host synchronisation per step. ``state_dict`` / ``load_state_dict`` carry the loss
history in a checkpoint.
"""

import torch

from ddpm.config.diffusion import TIMESTEP_SAMPLINGS
from ddpm.errors import InputError



class UniformSampler:
    """t ~ Uniform{0, …, T-1}."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def sample(self, batch_size: int, generator: torch.Generator, device) -> tuple[torch.Tensor, None]:
        return torch.randint(self.num_timesteps, (batch_size,), generator=generator, device=device), None

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {"kind": "uniform"}

    def load_state_dict(self, state: dict) -> None:
        pass


class ImportanceSampler:
    """Loss-aware importance sampling of t (Nichol & Dhariwal 2021, sec. 3.3)."""

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 1e-3, device="cpu"):
        self.num_timesteps, self.history_per_term, self.uniform_prob = num_timesteps, history_per_term, uniform_prob
        self.history = torch.zeros(num_timesteps, history_per_term, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long, device=device)

    def probabilities(self) -> torch.Tensor:
        """p_t, shape [T]: ∝ sqrt(mean of the recent L_t²) once every t has its full history, else uniform."""
        T = self.num_timesteps
        uniform = torch.full((T,), 1.0 / T, dtype=torch.float64, device=self.history.device)
        # (1) p_t ∝ sqrt(E[L_t²])   (eq. 18's sampling distribution)
        p = self.history.pow(2).mean(1).sqrt()
        p = p / p.sum().clamp(min=1e-300)
        # (2) mix in a uniform share so that every t keeps being visited
        p = p * (1.0 - self.uniform_prob) + self.uniform_prob / T
        p = p / p.sum()  # (exactly 1 already, unless every recorded L_t was 0)
        # (3) uniform until every t has history_per_term values (a tensor condition: no host sync)
        warm = (self.counts >= self.history_per_term).all()
        return torch.where(warm, p, uniform)

    def sample(self, batch_size: int, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.probabilities().to(device)
        # (1) t ~ p by inverting the CDF (multinomial would synchronise on CUDA)
        cdf = p.cumsum(0)
        u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64) * cdf[-1]
        t = torch.searchsorted(cdf, u, right=True).clamp(max=self.num_timesteps - 1)
        # (2) weights 1 / (T p_t): E_{t~p}[w_t L_t] = E_{t~U}[L_t]
        weights = (1.0 / (self.num_timesteps * p[t])).float()
        return t, weights

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Append each example's L_t to the ring buffer of its t (in batch order), on the device."""
        t = t.to(self.history.device)
        losses = losses.detach().to(self.history.device, torch.float64)
        K = self.history_per_term
        # (1) rank of each example among the batch's examples with the same t, and their number per t
        onehot = torch.zeros(t.shape[0], self.num_timesteps, dtype=torch.long, device=t.device)
        onehot.scatter_(1, t[:, None], 1)  # (F.one_hot would check the range of t: a host sync)
        rank = onehot.cumsum(0).gather(1, t[:, None]).squeeze(1) - 1
        per_t = onehot.sum(0)
        # (2) slot in the ring buffer; only the last K of a t's examples survive (as if appended in order)
        slot = (self.counts[t] + rank) % K
        keep = rank >= per_t[t] - K
        rows = torch.where(keep, t, torch.full_like(t, self.num_timesteps))  # dropped rows go to a spare row
        buffer = torch.cat([self.history, self.history.new_zeros(1, K)])
        buffer[rows, slot] = torch.where(keep, losses, torch.zeros_like(losses))
        self.history = buffer[:-1]
        self.counts = self.counts + per_t

    def state_dict(self) -> dict:
        return {"kind": "importance", "history": self.history.cpu(), "counts": self.counts.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "importance" or state["history"].shape != self.history.shape:
            raise InputError("the timestep-sampler state does not match importance sampling with "
                             f"T={self.num_timesteps}, {self.history_per_term} values per t")
        device = self.history.device
        self.history, self.counts = state["history"].to(device, torch.float64), state["counts"].to(device)


def make_timestep_sampler(name: str, num_timesteps: int, device="cpu") -> UniformSampler | ImportanceSampler:
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "importance":
        return ImportanceSampler(num_timesteps, device=device)
    raise InputError(f"unknown timestep_sampling {name!r}; choose one of {', '.join(TIMESTEP_SAMPLINGS)}")
