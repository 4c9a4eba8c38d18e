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


def bound(model, diffusion, images: torch.Tensor, p, spec, dev) -> dict:
    """The bound of each of ``images`` (uint8) in batches of ``nll.batch_size``, with a progress bar: the
    per-image totals, prior and decoder terms [N], and the sum of every term per timestep [T]."""
    g = torch.Generator(device=dev).manual_seed(p.seed)
    parts: dict[str, list] = {"total": [], "prior": [], "decoder": [], "terms": []}
    n = images.shape[0]
    with progress(n * spec.timesteps, "nll") as bar:
        for i in range(0, n, p.batch_size):
            x0 = to_model_range(images[i:i + p.batch_size].to(dev))
            out = nll_bits_per_dim(model, diffusion, x0, prediction=spec.prediction, variance=spec.variance,
                                   clip=p.clip, generator=g, progress=lambda k, b=x0.shape[0]: bar(k * b))
            for key in ("total", "prior", "decoder"):
                parts[key].append(out[key].cpu())
            parts["terms"].append(out["terms"].sum(0).cpu())
    return {"total": torch.cat(parts["total"]), "prior": torch.cat(parts["prior"]),
            "decoder": torch.cat(parts["decoder"]), "terms": torch.stack(parts["terms"]).sum(0)}


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
    denoiser = make_denoiser(net, dev, precision=p.precision, memory_format=p.memory_format, compile=p.compile,
                             work=n * spec.timesteps, role="likelihood")
    model = with_label(denoiser, spec.num_classes) if spec.num_classes else denoiser  # p(x): the null class
    start = time.perf_counter()
    b = bound(model, spec.build_diffusion(dev), split.images[:n], p, spec, dev)
    seconds = time.perf_counter() - start
    bpd = b["total"].mean().item()
    stderr = b["total"].std().item() / math.sqrt(n) if n > 1 else 0.0
    write_metrics(metrics, {"nll": {"bits_per_dim": round(bpd, 5), "bits_per_dim_stderr": round(stderr, 5),
                                 "prior_bits_per_dim": round(b["prior"].mean().item(), 7),
                                 "decoder_bits_per_dim": round(b["decoder"].mean().item(), 5),
                                 "test_images": n, "timesteps": spec.timesteps, "checkpoint_step": ckpt["step"],
                                 "seconds": round(seconds, 2)}})
    write_csv(plot, ["t", "bits_per_dim"], [(t, f"{v:.6g}") for t, v in enumerate((b["terms"] / n).tolist())])
    print(f"nll: {bpd:.4f} ± {stderr:.4f} bits/dim on {n} test images ({spec.timesteps} terms) "
          f"in {seconds:.0f} s ({denoiser.path}) → {metrics}")


if __name__ == "__main__":
    app()
