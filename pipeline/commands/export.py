"""Command `export` (not a DVC stage): a trained model as a diffusers pipeline folder.

    python -m pipeline export --checkpoint models/model.pt --out exported/

writes what ``DDPMPipeline.from_pretrained("exported")`` and ``DDIMPipeline.from_pretrained``
load: ``unet/`` (a diffusers ``UNet2DModel`` holding the EMA weights, as safetensors),
``scheduler/`` (a ``DDPMScheduler`` with exactly the model's β as ``trained_betas``, its
prediction type and its variance) and ``model_index.json``. The mapping is the library's
(``ddpm.diffusers_format``); here the diffusers objects are built from it, the weights loaded
strictly, and before anything is written the diffusers network is run against ours on a random
batch (the largest difference is printed). What diffusers cannot represent stops the command
before any work, naming it. This module is the only one that imports diffusers.
"""

import math
import shutil
from pathlib import Path

import torch
import typer

from ddpm.checkpoint import CheckpointError
from ddpm.config.sampling import WEIGHTS
from ddpm.diffusers_format import diffusers_state_dict, group_counts, scheduler_config, unet_config, unsupported
from ddpm.errors import InputError
from ddpm.model import ModelSpec, load_model
from ddpm.unet import UNet
from pipeline.outputs import check_writable
from pipeline.stages._cli import one_line, stage_app

TOLERANCE = 1e-4  # max |ours - theirs| / (1 + max |ours|) accepted by the check


class ExportError(InputError):
    """The model cannot be represented in diffusers."""


def to_diffusers(net: UNet, spec: ModelSpec):
    """(``UNet2DModel`` with our weights, the matching ``DDPMScheduler``); ExportError if unsupported."""
    problems = unsupported(spec, net)
    if problems:
        raise ExportError("diffusers cannot represent this model: " + "; ".join(problems))
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel(**unet_config(spec, group_counts(net)[0]))
    unet.load_state_dict(diffusers_state_dict(net), strict=True)
    return unet.eval(), DDPMScheduler(**scheduler_config(spec))


def max_difference(net: UNet, unet, spec: ModelSpec, seed: int = 0) -> float:
    """max |ours(x, t) - theirs(x, t)| / (1 + max |ours|) on a random batch at a few timesteps."""
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([0, spec.timesteps // 2, spec.timesteps - 1])
    x = torch.randn(len(t), spec.channels, spec.image_size, spec.image_size, generator=g)
    with torch.no_grad():
        ours, theirs = net(x, t), unet(x, t).sample
    return ((ours - theirs).abs().max() / (1 + ours.abs().max())).item()


def main(checkpoint: Path, out: Path, weights: str = "ema") -> None:
    if weights not in WEIGHTS:
        raise InputError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    net, spec, ckpt = load_model(checkpoint, "cpu", weights=weights)
    problems = unsupported(spec, net)
    if problems:
        raise ExportError(f"{checkpoint}: diffusers cannot represent this model: " + "; ".join(problems))
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"cannot write {out}: it is a file, expected a folder")
    check_writable(folders=[out])
    from diffusers import DDPMPipeline

    unet, scheduler = to_diffusers(net, spec)
    diff = max_difference(net, unet, spec)
    if not math.isfinite(diff) or diff > TOLERANCE:
        raise RuntimeError(f"the diffusers network differs from ours by {diff:.3g} (> {TOLERANCE}): "
                           "a bug in the export")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
    except BaseException:  # an error, Ctrl-C or SIGTERM: nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"export: {checkpoint} ({weights} weights, step {ckpt['step']}) → {out} "
          f"(UNet2DModel + DDPMScheduler, safetensors; max relative difference {diff:.2g}); load with "
          f"diffusers.DDPMPipeline.from_pretrained({str(out)!r}) or DDIMPipeline")


app = stage_app()


@app.command()
def export(checkpoint: Path = typer.Option(Path("models/model.pt"), help="a checkpoint the train stage wrote"),
           out: Path = typer.Option(Path("exported"), help="folder for the diffusers pipeline (unet/, scheduler/)"),
           weights: str = typer.Option("ema", help="ema | raw")):
    """Export a trained model to diffusers: UNet2DModel + DDPMScheduler as safetensors, for
    DDPMPipeline / DDIMPipeline.from_pretrained(out). Not a DVC stage."""
    one_line(main)(checkpoint, out, weights)
