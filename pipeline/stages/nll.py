"""Stage `nll`: the negative log-likelihood of the test split in bits/dim, from the full
variational bound (Ho et al. 2020, eq. 5; ``ddpm.likelihood.nll_bits_per_dim``) of the
checkpoint's averaged or raw weights (``nll.weights``: ema | raw), on the first
``nll.num_images`` test images. Writes the DVC metrics file (``nll.bits_per_dim``, its standard
error, the prior and decoder terms, ``nll.test_images``, …) and the mean bound term per
timestep as a plot (Nichol & Dhariwal 2021, fig. 2); its row t is the timestep index of
``ddpm.diffusion`` (t = 0 the decoder term L_0, t ≥ 1 the KL terms; the prior term L_T is
in the metrics only). A class-conditional model is scored as the unconditional model p(x)
it also is (the null class), comparable with an unconditional one."""

import math
import time
from pathlib import Path

import torch
import typer

from ddpm.acceleration import make_denoiser
from ddpm.data import load_split
from ddpm.errors import InputError
from ddpm.guidance import with_label
from ddpm.likelihood import nll_bits_per_dim
from ddpm.model import load_model
from ddpm.pixels import to_model_range
from pipeline.device import resolve_device
from pipeline.outputs import check_writable, write_csv, write_metrics
from pipeline.params import base, nll
from pipeline.progress import progress
from pipeline.stages._cli import DEVICE, PARAMS, stage, stage_app

KEYS = ["nll"]

app = stage_app()


@app.command()
@stage
def main(params: Path = PARAMS,
         checkpoint: Path = typer.Option(Path("models/model_ema.pt"), help="the ema stage's checkpoint"),
         data: Path = typer.Option(Path("data/prepared/test.pt"), help="the test split"),
         metrics: Path = typer.Option(Path("metrics/nll.json"), help="bits/dim and its parts"),
         plot: Path = typer.Option(Path("plots/nll_terms.csv"), help="mean bound term per timestep (t, bits_per_dim)"),
         device: str = DEVICE):
    """NLL of the test split in bits/dim from the full variational bound (nll.*; nll.weights: ema | raw)."""
    p = base.load(params, "nll", KEYS, nll).nll
    check_writable(metrics, plot)
    split = load_split(data)
    dev = resolve_device(device)
    net, spec, ckpt = load_model(checkpoint, dev, weights=p.weights)
    if tuple(split.images.shape[1:]) != (spec.channels, spec.image_size, spec.image_size):
        raise InputError(f"{data}: images of shape {tuple(split.images.shape[1:])} do not fit the model in "
                         f"{checkpoint} ({spec.channels}×{spec.image_size}×{spec.image_size})")
    n = min(p.num_images, split.images.shape[0])
    diffusion = spec.build_diffusion(dev)
    denoiser = make_denoiser(net, dev, precision=p.precision, memory_format=p.memory_format, compile=p.compile,
                             work=n * spec.timesteps, role="likelihood")
    model = with_label(denoiser, spec.num_classes) if spec.num_classes else denoiser  # p(x): the null class
    g = torch.Generator(device=dev).manual_seed(p.seed)
    totals, priors, decoders, terms = [], [], [], []
    start = time.perf_counter()
    with progress(n * spec.timesteps, "nll") as bar:
        for i in range(0, n, p.batch_size):
            x0 = to_model_range(split.images[i:min(i + p.batch_size, n)].to(dev))
            out = nll_bits_per_dim(model, diffusion, x0, prediction=spec.prediction, variance=spec.variance,
                                   clip=p.clip, generator=g,
                                   progress=lambda k, b=x0.shape[0]: bar(k * b))
            totals.append(out["total"].cpu())
            priors.append(out["prior"].cpu())
            decoders.append(out["decoder"].cpu())
            terms.append(out["terms"].sum(0).cpu())
    seconds = time.perf_counter() - start
    total = torch.cat(totals)
    bpd = total.mean().item()
    stderr = total.std().item() / math.sqrt(n) if n > 1 else 0.0
    write_metrics(metrics, {"nll": {"bits_per_dim": round(bpd, 5), "bits_per_dim_stderr": round(stderr, 5),
                                 "prior_bits_per_dim": round(torch.cat(priors).mean().item(), 7),
                                 "decoder_bits_per_dim": round(torch.cat(decoders).mean().item(), 5),
                                 "test_images": n, "timesteps": spec.timesteps, "checkpoint_step": ckpt["step"],
                                 "seconds": round(seconds, 2)}})
    mean_terms = (torch.stack(terms).sum(0) / n).tolist()
    write_csv(plot, ["t", "bits_per_dim"], [(t, f"{v:.6g}") for t, v in enumerate(mean_terms)])
    print(f"nll: {bpd:.4f} ± {stderr:.4f} bits/dim on {n} test images ({spec.timesteps} terms) "
          f"in {seconds:.0f} s ({denoiser.path}) → {metrics}")


if __name__ == "__main__":
    app()
