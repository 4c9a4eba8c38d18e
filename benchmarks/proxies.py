"""CPU-measurable proxies for the GPU's launch overhead: the aten operations that PyTorch dispatches
per training step and per sampling step, and how many of a sampling step's are casts.

On a GPU each dispatched operation is (at least) one kernel launch issued from Python, so a
small network at a moderate batch is host-bound when it dispatches thousands per step; the count
is the same on any machine, so it can be measured and bounded where there is no GPU. Counted by a
``TorchDispatchMode`` over ``ddpm.training.train`` (steps after the first: the first builds the
optimizer state) and over ``ddpm.samplers.sample`` through ``ddpm.acceleration.make_denoiser``
(what the sample stage runs), eager, at the precision asked for. A cast is an operation that turns
a floating-point tensor into another dtype (``to``, ``_to_copy``, or ``copy_`` between dtypes).
"""

import collections
from dataclasses import replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddpm.acceleration import make_denoiser
from ddpm.diffusion import Diffusion
from ddpm.samplers import sample
from ddpm.training import TrainConfig, init_state, train
from ddpm.unet import UNet, UNetConfig

CAST_OPS = ("to", "_to_copy")


def _dtype(x):
    return x.dtype if isinstance(x, torch.Tensor) else None


class DispatchCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while ``on`` (by name), and the casts among them."""

    def __init__(self):
        super().__init__()
        self.on, self.ops, self.casts = False, collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.on:
            name = func.overloadpacket.__name__
            self.ops[name] += 1
            source = _dtype(args[1]) if name == "copy_" else _dtype(args[0]) if args else None
            target = _dtype(args[0]) if name == "copy_" else _dtype(out)
            if (name in CAST_OPS or name == "copy_") and source is not None and target is not None \
                    and source != target and source.is_floating_point:
                self.casts[name] += 1
        return out


def count_train(unet: UNetConfig, image_size: int, channels: int, *, precision: str = "fp32", batch_size: int = 4,
                steps: int = 3) -> dict:
    """Operations per training step of ``ddpm.training.train`` (default config: clipping, the EMA and two
    post-hoc profiles), counted over ``steps`` steps after a first one."""
    torch.manual_seed(0)
    net = UNet(unet, image_size=image_size, in_channels=channels, out_channels=channels)
    cfg = TrainConfig(steps=1, batch_size=batch_size, warmup_steps=1, log_every=10**9, precision=precision,
                      compile="none", ema_snapshot_every=0)
    images = torch.randint(0, 256, (4 * batch_size, channels, image_size, image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    d = Diffusion.from_schedule("linear", 1000)
    state = init_state(net, replace(cfg, ema_snapshot_every=1), 0, "cpu")  # with the profiles
    train(state, d, images, replace(cfg, ema_snapshot_every=1))
    counter = DispatchCounter()

    def progress(_):  # count from the end of the first step counted here on
        counter.on = True

    with counter:
        train(state, d, images, replace(cfg, steps=state.step + 1 + steps, ema_snapshot_every=1), progress=progress)
    # the last step's tail after its progress call is counted, the first's head is not: steps whole steps
    return {"ops_per_step": sum(counter.ops.values()) / steps, "by_op": dict(counter.ops.most_common(12))}


def count_sample(unet: UNetConfig, image_size: int, channels: int, *, precision: str = "fp32", sampler: str = "ddim",
                 batch_size: int = 2, steps: int = 4) -> dict:
    """Operations and casts per sampling step of ``sample`` through ``make_denoiser`` (weights cast once)."""
    torch.manual_seed(0)
    net = UNet(unet, image_size=image_size, in_channels=channels, out_channels=channels)
    denoiser = make_denoiser(net, "cpu", precision=precision, compile="none")
    d = Diffusion.from_schedule("linear", 1000)
    shape = (batch_size, channels, image_size, image_size)
    sample(denoiser, d, shape, sampler=sampler, steps=2)  # warm-up
    counter = DispatchCounter()
    counter.on = True
    with counter:
        sample(denoiser, d, shape, sampler=sampler, steps=steps)
    return {"ops_per_step": sum(counter.ops.values()) / steps, "casts_per_step": sum(counter.casts.values()) / steps,
            "by_op": dict(counter.ops.most_common(12)), "casts_by_op": dict(counter.casts)}


def proxies(unet: UNetConfig, image_size: int, channels: int, precisions=("fp32", "bf16")) -> dict:
    """Both counts at each precision."""
    return {p: {"train": count_train(unet, image_size, channels, precision=p),
                "sample": count_sample(unet, image_size, channels, precision=p)} for p in precisions}
