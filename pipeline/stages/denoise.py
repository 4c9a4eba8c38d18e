"""Stage `denoise`: the held-out denoising MSE (``ddpm.evaluation.denoising_mse``: L_simple
in ε space, at a fixed grid of ``denoise.timesteps`` timesteps with fixed noise) of three
networks side by side, on the first ``denoise.num_images`` test images:

- ``ema``: the checkpoint's averaged weights (what `sample` uses by default),
- ``raw``: its raw weights of the last training step,
- ``untrained``: the same architecture at initialisation, from the training seed (so
  train's own initial weights).

An average that is right is at least as good as the raw weights (``ema_over_raw`` ≤ 1,
up to noise); a trained network is far below the untrained one (about 1 for ε-prediction).
A class-conditional model is scored as the unconditional model p(x), with its null class
(label ``num_classes``), as `nll` scores it.
Writes ``metrics/denoise.json`` (``denoise.ema_mse``, ``denoise.raw_mse``,
``denoise.untrained_mse``, ``denoise.ema_over_raw``, …: the columns of `dvc exp show`) and the
MSE per timestep of the grid as a plot, ``plots/denoise_by_timestep.csv`` (t, and one column
per network), not as metrics. A few seconds on the CPU preset's model."""

import time
from pathlib import Path

import torch
import typer

from ddpm.data import load_split
from ddpm.errors import InputError
from ddpm.evaluation import denoising_mse
from ddpm.model import load_model
from ddpm.pixels import to_model_range
from pipeline.device import resolve_device
from pipeline.outputs import check_writable, write_csv, write_metrics
from pipeline.params import base, denoise
from pipeline.stages._cli import DEVICE, PARAMS, stage, stage_app

KEYS = ["denoise"]

app = stage_app()


NETWORKS = ("ema", "raw", "untrained")


@app.command()
@stage
def main(params: Path = PARAMS,
         checkpoint: Path = typer.Option(Path("models/model_ema.pt"), help="the ema stage's checkpoint"),
         data: Path = typer.Option(Path("data/prepared/test.pt"), help="the test split"),
         metrics: Path = typer.Option(Path("metrics/denoise.json"), help="MSE of the raw, EMA and untrained weights"),
         plot: Path = typer.Option(Path("plots/denoise_by_timestep.csv"),
                                   help="the MSE of each network per timestep of the grid"),
         device: str = DEVICE):
    """Held-out denoising MSE (ε) of the raw, EMA and untrained weights, side by side (denoise.*)."""
    p = base.load(params, "denoise", KEYS, denoise).denoise
    check_writable(metrics, plot)
    split = load_split(data)
    dev = resolve_device(device)
    nets = {}
    for weights in ("raw", "ema"):
        nets[weights], spec, ckpt = load_model(checkpoint, dev, weights=weights)
    if tuple(split.images.shape[1:]) != (spec.channels, spec.image_size, spec.image_size):
        raise InputError(f"{data}: images of shape {tuple(split.images.shape[1:])} do not fit the model in "
                         f"{checkpoint} ({spec.channels}×{spec.image_size}×{spec.image_size})")
    if not 1 <= p.timesteps <= spec.timesteps:
        raise InputError(f"denoise.timesteps must be in [1, {spec.timesteps}] for {checkpoint}, got {p.timesteps}")
    torch.manual_seed(ckpt["config"].get("seed", 0))  # as train does before building the network
    nets["untrained"] = spec.build_unet().to(dev)
    diffusion = spec.build_diffusion(dev)
    x0 = to_model_range(split.images[:p.num_images])
    start = time.perf_counter()
    results = {name: denoising_mse(net, diffusion, x0, prediction=spec.prediction, variance=spec.variance,
                                   num_timesteps=p.timesteps, seed=p.seed, batch_size=p.batch_size,
                                   label=spec.num_classes or None)
               for name, net in nets.items()}
    seconds = time.perf_counter() - start
    mse = {name: results[name]["mse"] for name in NETWORKS}
    write_metrics(metrics, {"denoise": {**{f"{k}_mse": round(v, 6) for k, v in mse.items()},
                                     "ema_over_raw": round(mse["ema"] / mse["raw"], 4),
                                     "test_images": x0.shape[0], "checkpoint_step": ckpt["step"],
                                     "seconds": round(seconds, 2)}})
    write_csv(plot, ["t", *(f"{k}_mse" for k in NETWORKS)],
              [(t, *(f"{results[k]['by_timestep'][t]:.6g}" for k in NETWORKS)) for t in results["ema"]["by_timestep"]])
    print(f"denoise: held-out ε-MSE raw {mse['raw']:.4f}, ema {mse['ema']:.4f} ({mse['ema'] / mse['raw']:.3f}× raw), "
          f"untrained {mse['untrained']:.4f} on {x0.shape[0]} test images in {seconds:.1f} s → {metrics}, {plot}")


if __name__ == "__main__":
    app()
