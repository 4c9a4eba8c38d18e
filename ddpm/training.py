"""The training loop: AdamW with linear warm-up, gradient clipping, and an EMA of the
weights kept by ``torch.optim.swa_utils.AveragedModel``.

The data set is one uint8 tensor [N, C, H, W] held on the training device; each step
draws a batch of indices, a timestep t ~ Uniform{0, …, T-1} and noise ε ~ N(0, I)
per example from one seeded ``torch.Generator``, so a run is a function of its seed.
The loss is logged every ``log_every`` steps only (no host synchronisation per step).
``precision``, ``memory_format`` and ``compile`` select the GPU fast path (see
``ddpm.acceleration``); their defaults leave a CPU run unchanged.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ddpm.acceleration import autocast_context, compile_model, make_adamw, prepare_model, to_memory_format
from ddpm.diffusion import Diffusion
from ddpm.objectives import training_losses


@dataclass
class TrainConfig:
    steps: int = 20000
    batch_size: int = 128
    lr: float = 2.0e-4
    warmup_steps: int = 1000
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    log_every: int = 100
    augment: Literal["none", "hflip"] = "none"
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"  # tf32/bf16: CUDA only
    memory_format: Literal["contiguous", "channels_last"] = "contiguous"
    compile: Literal["none", "default", "max-autotune"] = "none"


@dataclass
class TrainState:
    model: torch.nn.Module
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] → uint8 [0, 255], rounding to the nearest level."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def init_state(model: torch.nn.Module, cfg: TrainConfig, seed: int, device) -> TrainState:
    model = prepare_model(model, device, precision=cfg.precision, memory_format=cfg.memory_format, compile=cfg.compile)
    optimizer = make_adamw(model.parameters(), device, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(cfg.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return TrainState(model, ema, optimizer, scheduler, generator)


def train(
    state: TrainState,
    diffusion: Diffusion,
    images: torch.Tensor,
    cfg: TrainConfig,
    *,
    prediction: str = "eps",
    loss: str = "simple",
    progress: Callable[[int], None] | None = None,
    on_log: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Train ``state`` in place from ``state.step`` up to ``cfg.steps``; returns it."""
    device = diffusion.device
    images = images.to(device)
    g, T, n = state.generator, diffusion.num_timesteps, images.shape[0]
    model = state.model.train()
    forward = compile_model(model, cfg.compile)
    running = torch.zeros((), device=device)
    since_log = 0
    while state.step < cfg.steps:
        # (1) a batch x_0 ~ q(x_0), t ~ U{0..T-1}, ε ~ N(0, I)   (Algorithm 1, lines 2-4)
        idx = torch.randint(n, (cfg.batch_size,), generator=g, device=device)
        x0 = to_model_range(images[idx])
        if cfg.augment == "hflip":
            flip = torch.rand(cfg.batch_size, generator=g, device=device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(T, (cfg.batch_size,), generator=g, device=device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        # (2) gradient step on the objective   (Algorithm 1, line 5)
        x0, noise = to_memory_format(x0, cfg.memory_format), to_memory_format(noise, cfg.memory_format)
        with autocast_context(cfg.precision, device):
            loss_value = training_losses(forward, diffusion, x0, t, noise, prediction, loss).mean()
        state.optimizer.zero_grad(set_to_none=True)
        loss_value.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        state.optimizer.step()
        state.scheduler.step()
        state.ema.update_parameters(model)
        state.step += 1
        running += loss_value.detach()
        since_log += 1
        if progress is not None:
            progress(1)
        if state.step % cfg.log_every == 0 or state.step == cfg.steps:
            mean_loss = (running / since_log).item()  # the only host sync, every log_every steps
            if not torch.isfinite(torch.tensor(mean_loss)):
                raise FloatingPointError(f"loss became {mean_loss} at step {state.step}")
            state.losses.append((state.step, mean_loss))
            running.zero_()
            since_log = 0
            if on_log is not None:
                on_log(state)
    return state
