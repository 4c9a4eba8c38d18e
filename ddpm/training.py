"""The training loop: AdamW with linear warm-up, gradient clipping, and averages of the
weights kept by ``torch.optim.swa_utils.AveragedModel`` (``ddpm.ema``): the EMA named by
``ema`` (power-function EMA by default), and the power EMAs of ``ema_profiles``, which
``on_snapshot`` receives every ``ema_snapshot_every`` steps and after the last step, for
post-hoc EMA (``ddpm.posthoc_ema``).

The data set is one uint8 tensor [N, C, H, W] held on the training device; each step
draws a batch of indices, a timestep t (uniform, or importance-sampled: see
``ddpm.timestep_sampling``) and noise ε ~ N(0, I) per example from one seeded
``torch.Generator``, so a run is a function of its seed.
A class-conditional model also gets each example's label, replaced by the null class
with probability ``cond_drop`` (classifier-free guidance training, ``ddpm.guidance``),
drawn from the same generator.
The loss is logged every ``log_every`` steps only (no host synchronisation per step), and
``state.grad_norm`` then holds that step's total gradient norm before clipping;
a non-finite loss stops training with ``ddpm.errors.DivergedError`` (a ``FloatingPointError``)
naming the first bad step.

Data-parallel (``ddpm.distributed``): every rank draws the same global batch from the
shared generator and trains on its shard; DDP averages the gradients, so N ranks follow
the single-process run with the same ``batch_size``. (With importance sampling each rank
updates its own loss history from its shard.)

Resuming: ``train_state_dict`` turns the whole ``TrainState`` (weights, EMA, optimizer,
scheduler, step, losses, the profiles, the timestep sampler, the batch generator and the global
torch/CUDA RNG states that dropout uses) into plain data that
``torch.load(weights_only=True)`` reads back; ``load_train_state`` restores it, and
training continues exactly where it stopped.
``precision``, ``memory_format`` and ``compile`` select the fast path (see
``ddpm.acceleration``); their default ``auto`` is the GPU fast path on CUDA and leaves a
CPU run plain fp32. With ``bf16`` only the network's forward runs under autocast: the
loss, the variational bound and the tables stay float32.
"""

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch.optim.swa_utils import AveragedModel

from ddpm import distributed
from ddpm.acceleration import (CapturedStep, Fallback, compile_model,
                               make_adamw, network, prepare_model, resolve, to_memory_format)
from ddpm.diffusion import Diffusion
from ddpm.distributed import SINGLE, World
from ddpm.config.training import PowerEMA, TrainConfig
from ddpm.ema import Averages, averaged_model
from ddpm.errors import DivergedError, InputError
from ddpm.guidance import drop_labels
from ddpm.objectives import training_terms
from ddpm.pixels import to_model_range
from ddpm.timestep_sampling import ImportanceSampler, UniformSampler


@dataclass
class TrainState:
    model: torch.nn.Module
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    profiles: list[AveragedModel] = field(default_factory=list)  # post-hoc EMA profiles (power EMAs)
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    pending: list[torch.Tensor] = field(default_factory=list)  # per-step losses since the last log, on device
    grad_norm: torch.Tensor | None = None  # total gradient norm (before clipping) of the latest logged step, on device
    path: str = ""  # the fast path the latest ``train`` call ran (``FastPath.describe``, with any fall-back)
    # the compiled forward per (compile mode, module): built once, reused by later ``train`` calls (not saved)
    compiled: dict = field(default_factory=dict, repr=False)


def init_state(model: torch.nn.Module, cfg: TrainConfig, seed: int, device) -> TrainState:
    model = prepare_model(model, device, precision=cfg.precision, memory_format=cfg.memory_format, compile=cfg.compile)
    optimizer = make_adamw(model.parameters(), device, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(cfg.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    ema = averaged_model(model, cfg.ema)
    profiles = [averaged_model(model, PowerEMA(sigma_rel=s)) for s in cfg.ema_profiles] if cfg.snapshot_steps else []
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return TrainState(model, ema, optimizer, scheduler, generator, profiles)


def learning_rate(scheduler: torch.optim.lr_scheduler.LRScheduler, step: int) -> float:
    """The learning rate of the update that makes step ``step`` (counted from 1): the schedule's
    factor after ``step - 1`` scheduler steps (``train`` steps the scheduler after each update,
    so ``get_last_lr()`` after step k is already the rate of step k + 1)."""
    return scheduler.base_lrs[0] * scheduler.lr_lambdas[0](step - 1)


def train(
    state: TrainState,
    diffusion: Diffusion,
    images: torch.Tensor,
    cfg: TrainConfig,
    *,
    prediction: str = "eps",
    loss: str = "simple",
    world: World = SINGLE,
    variance: str = "fixed_small",
    hybrid_lambda: float = 1.0e-3,
    timestep_sampler: UniformSampler | ImportanceSampler | None = None,
    labels: torch.Tensor | None = None,
    cond_drop: float = 0.0,
    progress: Callable[[int], None] | None = None,
    on_log: Callable[[TrainState], None] | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    on_snapshot: Callable[[TrainState], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> TrainState:
    """Train ``state`` in place from ``state.step`` up to ``cfg.steps``; returns it.

    ``on_checkpoint`` runs on every rank every ``cfg.checkpoint_every`` steps, after the
    losses and weights so far were checked finite (a collective: it may call
    ``train_state_dict``). ``timestep_sampler`` draws t (default uniform); an importance
    sampler is updated in place. ``on_snapshot`` runs on every rank after each step of
    ``cfg.snapshot_steps``, before that step's checkpoint, with the losses so far checked finite.
    ``labels`` (int64 [N], for a class-conditional model, whose ``num_classes`` is the null
    class) go with ``images``; each is dropped to the null class with probability ``cond_drop``.

    ``stop`` (asked after every step; on several ranks after every ``log_every`` steps, where the ranks
    agree, so that all stop at the same step) ends training early at a step boundary: the checkpoint of
    that step is written (``on_checkpoint``, when ``checkpoint_every`` > 0) and ``state`` returned with
    ``state.step`` < ``cfg.steps``."""
    device = diffusion.device
    images = images.to(device)
    labels = None if labels is None else labels.to(device)
    sampler = timestep_sampler if timestep_sampler is not None else UniformSampler(diffusion.num_timesteps)
    world.shard(cfg.batch_size)  # the batch must split over the ranks
    model = distributed.wrap(state.model.train(), world)
    fast = resolve(device, cfg.precision, cfg.memory_format, cfg.compile, distributed=world.is_distributed,
                   work=max(cfg.steps - state.step, 0) * cfg.batch_size)
    # every average of the weights in one multi-tensor update per step, no host sync (ddpm.ema.Averages)
    averages = Averages(state.model, [(state.ema, cfg.ema),
                                      *zip(state.profiles, (PowerEMA(sigma_rel=s) for s in cfg.ema_profiles))])

    def objective(forward, x0, t, noise, y, weights):
        """Forward, the loss and backward (Algorithm 1, line 5); the per-example terms and the loss."""
        terms = training_terms(forward, diffusion, x0, t, noise, prediction, loss, variance, hybrid_lambda, labels=y)
        losses = terms["loss"] if weights is None else terms["loss"] * weights  # importance sampling: 1 / (T p_t)
        loss_value = losses.mean()
        loss_value.backward()
        return terms, loss_value

    plain = network(model, fast.precision, device)
    if fast.compile == "step-graph":
        return _train_step_graph(state, diffusion, images, cfg, world, fast, objective, plain, averages, sampler,
                                 labels, cond_drop, progress, on_log, on_checkpoint, on_snapshot, stop)
    compiled = None
    if fast.compile != "none":
        key = (fast.compile, id(model))
        if key not in state.compiled:
            state.compiled = {key: compile_model(model, fast.compile)}  # the wrapper of an earlier module is dropped
        compiled = network(state.compiled[key], fast.precision, device)
    step = Fallback(None if compiled is None else lambda *a: objective(compiled, *a), lambda *a: objective(plain, *a),
                    fast.describe(), replace(fast, compile="none", note="").describe(),
                    reset=lambda: state.optimizer.zero_grad(set_to_none=True))
    snapshots = set(cfg.snapshot_steps)
    while state.step < cfg.steps:
        # (1) a batch x_0 ~ q(x_0), t ~ U{0..T-1}, ε ~ N(0, I)   (Algorithm 1, lines 2-4)
        x0, t, noise, y, weights = _batch(state, images, labels, cond_drop, sampler, cfg, world, fast, device)
        # (2) gradient step on the objective   (Algorithm 1, line 5)
        state.optimizer.zero_grad(set_to_none=True)
        terms, loss_value = step(x0, t, noise, y, weights)
        state.path = step.path
        if weights is not None:  # importance sampling: record L_t
            sampler.update(t, terms["vlb"])
        if cfg.grad_clip > 0:
            state.grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
        elif (state.step + 1) % cfg.log_every == 0 or state.step + 1 == cfg.steps:  # only logged steps need it
            state.grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in state.model.parameters() if p.grad is not None])
        state.optimizer.step()
        state.scheduler.step()
        averages.update()
        if _after_step(state, loss_value.detach(), cfg, world, snapshots, progress, on_log, on_checkpoint,
                       on_snapshot, stop):
            break
    return state


def _batch(state: TrainState, images, labels, cond_drop: float, sampler, cfg: TrainConfig, world: World, fast,
           device):
    """(x_0, t, ε, labels or None, importance weights or None) of the next step, from the state's generator:
    every rank draws the global batch and keeps its shard."""
    g, n, mine = state.generator, images.shape[0], world.shard(cfg.batch_size)
    idx = torch.randint(n, (cfg.batch_size,), generator=g, device=device)
    x0 = to_model_range(images[idx[mine]])
    if cfg.augment == "hflip":
        flip = torch.rand(cfg.batch_size, generator=g, device=device)[mine] < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    t, weights = sampler.sample(cfg.batch_size, g, device)
    t, weights = t[mine], (None if weights is None else weights[mine])
    noise = torch.randn((cfg.batch_size, *x0.shape[1:]), generator=g, device=device)[mine]
    y = None
    if labels is not None:  # class labels, each replaced by the null class with probability cond_drop
        y = drop_labels(labels[idx], cond_drop, state.model.num_classes, g)[mine]
    return (to_memory_format(x0, fast.memory_format), t, to_memory_format(noise, fast.memory_format), y, weights)


def _after_step(state: TrainState, loss_value: torch.Tensor, cfg: TrainConfig, world: World, snapshots: set,
                progress, on_log, on_checkpoint, on_snapshot, stop=None) -> bool:
    """Count the step; every ``log_every`` steps the losses (the only host sync), the snapshots and the
    checkpoint when due, each after the losses so far were checked finite. True when ``stop`` asks to
    stop after this step (``_stop_agreed``): then the checkpoint is written now."""
    state.step += 1
    state.pending.append(loss_value)
    if progress is not None:
        progress(1)
    if state.step % cfg.log_every == 0 or state.step == cfg.steps:
        losses = _checked_losses(state, world)  # the only host sync, every log_every steps
        state.losses.append((state.step, losses.mean().item()))
        state.pending.clear()
        if on_log is not None:
            on_log(state)
    if on_snapshot is not None and state.step in snapshots:
        _checked_losses(state, world)
        on_snapshot(state)
    stopping = stop is not None and state.step < cfg.steps and _stop_agreed(stop, state, cfg, world)
    if on_checkpoint is not None and cfg.checkpoint_every > 0 and (state.step % cfg.checkpoint_every == 0 or stopping):
        _checked_losses(state, world)
        bad = ~torch.stack([p.isfinite().all() for p in state.model.parameters()]).all()
        if bad.item():
            raise DivergedError(f"the weights became non-finite by step {state.step}")
        on_checkpoint(state)
    return stopping


def _stop_agreed(stop: Callable[[], bool], state: TrainState, cfg: TrainConfig, world: World) -> bool:
    """Whether to stop after this step: ``stop()`` on one process; on several only at logged steps, where
    the ranks agree (an all-reduce: every rank stops at the same step, or none does)."""
    if not world.is_distributed:
        return bool(stop())
    if state.step % cfg.log_every:
        return False
    return distributed.any_(bool(stop()), world, next(state.model.parameters()).device)


def _train_step_graph(state: TrainState, diffusion: Diffusion, images, cfg: TrainConfig, world: World, fast,
                      objective, plain, averages: Averages, sampler, labels, cond_drop, progress, on_log,
                      on_checkpoint, on_snapshot, stop) -> TrainState:
    """``train``'s loop with ``compile: step-graph``: the update (forward, backward, clipping, AdamW, the
    averages on the device) captured once as a CUDA graph and replayed every step (``CapturedStep``);
    the batch is drawn and the bookkeeping done as in the plain loop. AdamW takes its learning rate as
    a tensor (the scheduler fills it in place) and is capturable; without CUDA the same step runs
    uncaptured and eager. A capture that fails falls back to the plain eager step (``Fallback``)."""
    device = diffusion.device
    cuda = torch.device(device).type == "cuda"
    for group in state.optimizer.param_groups:  # the graph must read the learning rate, not bake it in
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        group["capturable"] = cuda
    params = list(state.model.parameters())
    forward = network(compile_model(state.model, "step-graph"), fast.precision, device) if cuda else plain

    def clip_norm() -> torch.Tensor:
        if cfg.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])

    def update(x0, t, noise, y, weights):
        terms, loss_value = objective(forward, x0, t, noise, y, weights)
        norm = clip_norm()
        state.optimizer.step()
        averages.update_on_device()
        return terms, loss_value, norm

    def plain_update(x0, t, noise, y, weights):
        state.optimizer.zero_grad(set_to_none=True)
        terms, loss_value = objective(plain, x0, t, noise, y, weights)
        norm = clip_norm()
        state.optimizer.step()
        averages.update()
        return terms, loss_value, norm

    def reset() -> None:  # before the plain retry of a failed capture: nothing of it ran
        state.optimizer.zero_grad(set_to_none=True)
        averages.resync()

    zero_grad = lambda: state.optimizer.zero_grad(set_to_none=True)  # noqa: E731
    step = Fallback(CapturedStep(update, zero_grad, capture=cuda), plain_update, fast.describe(),
                    replace(fast, compile="none", note="").describe(), reset=reset)
    snapshots = set(cfg.snapshot_steps)
    while state.step < cfg.steps:
        x0, t, noise, y, weights = _batch(state, images, labels, cond_drop, sampler, cfg, world, fast, device)
        terms, loss_value, norm = step(x0, t, noise, y, weights)
        state.path = step.path
        if weights is not None:
            sampler.update(t, terms["vlb"])
        if (state.step + 1) % cfg.log_every == 0 or state.step + 1 == cfg.steps:
            state.grad_norm = norm.clone()
        state.scheduler.step()
        # the graph's outputs are overwritten by the next replay: keep a copy of the loss
        if _after_step(state, loss_value.detach().clone(), cfg, world, snapshots, progress, on_log, on_checkpoint,
                       on_snapshot, stop):
            break
    averages.resync()
    return state


def _checked_losses(state: TrainState, world: World) -> torch.Tensor:
    """The per-step losses since the last log, averaged over ranks (a host sync); raises
    ``DivergedError`` (a FloatingPointError) naming the first step whose loss is NaN or infinite."""
    if not state.pending:
        return torch.zeros(0)
    losses = distributed.mean_(torch.stack(state.pending), world)
    state.pending = list(losses.unbind())  # every rank now holds the global means
    losses = losses.cpu()
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        i = bad[0].item()
        raise DivergedError(f"training loss became {losses[i].item()} at step {state.step - len(losses) + 1 + i}")
    return losses


# ------------------------------------------------------------------ resumable state
def to_cpu(obj):
    """Tensors in ``obj`` (nested dicts, lists, tuples) detached and on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def rng_state(device: torch.device) -> dict:
    """The global RNG states (CPU, and the device's CUDA generator) that dropout draws from."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(rng: dict, device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)


def train_state_dict(state: TrainState, world: World = SINGLE, timestep_sampler=None) -> dict | None:
    """``state`` (and the timestep sampler's loss history, when given) as plain CPU data
    (loads with ``weights_only=True``); collective over the ranks: rank 0 gets the dict,
    holding every rank's RNG states, the others ``None``."""
    device = next(state.model.parameters()).device
    rngs = distributed.gather(rng_state(device), world)
    if not world.is_main:
        return None
    return to_cpu({
        "step": state.step, "model": state.model.state_dict(), "ema": state.ema.state_dict(),
        "ema_profiles": [p.state_dict() for p in state.profiles],
        "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
        "generator": state.generator.get_state(), "rng": rngs, "losses": [list(x) for x in state.losses],
        "pending": torch.stack(state.pending) if state.pending else torch.zeros(0),
        "timestep_sampler": timestep_sampler.state_dict() if timestep_sampler is not None else {},
    })


def load_train_state(state: TrainState, d: dict, world: World = SINGLE, timestep_sampler=None) -> TrainState:
    """Restore ``state`` (and ``timestep_sampler``) in place from ``train_state_dict``'s output (on every rank)."""
    device = next(state.model.parameters()).device
    state.model.load_state_dict(d["model"])
    state.ema.load_state_dict(d["ema"])
    if len(d["ema_profiles"]) != len(state.profiles):
        raise InputError(f"the training state holds {len(d['ema_profiles'])} EMA profiles, the config {len(state.profiles)}")
    for profile, saved in zip(state.profiles, d["ema_profiles"]):
        profile.load_state_dict(saved)
    state.optimizer.load_state_dict(d["optimizer"])
    state.scheduler.load_state_dict(d["scheduler"])
    state.generator.set_state(d["generator"])
    if world.rank < len(d["rng"]):
        set_rng_state(d["rng"][world.rank], device)
    else:  # more ranks than when saved: a fresh dropout stream for this rank
        torch.manual_seed(distributed.derive_seed(d["step"], world.rank))
    state.step = int(d["step"])
    state.losses = [(int(s), float(v)) for s, v in d["losses"]]
    state.pending = list(d["pending"].to(device).unbind())
    if timestep_sampler is not None and d.get("timestep_sampler"):
        timestep_sampler.load_state_dict(d["timestep_sampler"])
    return state
