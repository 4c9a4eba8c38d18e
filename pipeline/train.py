"""Stage `train`: train the diffusion U-Net and write a self-describing checkpoint,
the training metrics and the loss curve."""

import time
from dataclasses import asdict
from pathlib import Path

import torch

from ddpm.checkpoint import save_checkpoint
from ddpm.data import load_split
from ddpm.model import ModelSpec
from ddpm.timestep_sampling import make_timestep_sampler
from ddpm.training import init_state, train
from pipeline.common import progress, resolve_device, write_csv, write_json
from pipeline.params import for_stage, load_params


def main(params_path: Path, data: Path, out: Path, metrics: Path, plot: Path, timing: Path, device: str) -> None:
    p = for_stage(load_params(params_path), "train")
    split = load_split(data)
    _, channels, height, width = split.images.shape
    if height != width:
        raise ValueError(f"{data}: images must be square, got {height}×{width}")
    spec = ModelSpec(unet=p.model, image_size=height, channels=channels, schedule=p.schedule,
                     timesteps=p.timesteps, prediction=p.prediction, variance=p.variance)
    dev = resolve_device(device)
    torch.manual_seed(p.seed)
    net = spec.build_unet()
    state = init_state(net, p.train, p.seed, dev)
    diffusion = spec.build_diffusion(dev)
    timestep_sampler = make_timestep_sampler(p.timestep_sampling, p.timesteps, dev)
    start = time.perf_counter()
    with progress(p.train.steps, "train") as bar:
        train(state, diffusion, split.images, p.train, prediction=p.prediction, loss=p.loss, variance=p.variance,
              hybrid_lambda=p.hybrid_lambda, timestep_sampler=timestep_sampler, progress=bar)
    seconds = time.perf_counter() - start
    objective = {"loss": p.loss, "hybrid_lambda": p.hybrid_lambda, "timestep_sampling": p.timestep_sampling}
    config = {"model": spec.to_dict(), "train": asdict(p.train), "seed": p.seed, "objective": objective}
    cpu = lambda sd: {k: v.detach().cpu() for k, v in sd.items()}  # noqa: E731
    save_checkpoint(out, step=state.step, config=config, model=cpu(net.state_dict()), ema=cpu(state.ema.state_dict()),
                    timestep_sampler=timestep_sampler.state_dict())
    write_csv(plot, ["step", "loss"], state.losses)
    n_params = sum(t.numel() for t in net.parameters())
    write_json(metrics, {"final_loss": round(state.losses[-1][1], 6), "steps": state.step, "parameters": n_params})
    write_json(timing, {"seconds": round(seconds, 2), "images_per_second": round(state.step * p.train.batch_size / seconds, 1),
                        "device": str(dev)})
    print(f"train: {state.step} steps, loss {state.losses[-1][1]:.4f}, {seconds:.0f} s on {dev} → {out}")
