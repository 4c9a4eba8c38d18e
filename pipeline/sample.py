"""Stage `sample`: draw samples from the trained model with one sampler × step count
(one cell of the sample matrix) and write them as uint8 plus a PNG grid.

Batch i of ``sample.batch_size`` images draws from its own generator, seeded with
``derive_seed(sample.seed, i)``, so the samples do not depend on how the batches are
spread: under ``torchrun`` rank r samples batches r, r+N, r+2N, … and rank 0 gathers
them and writes the files (all at the end, each atomically)."""

import time
from pathlib import Path

import torch

from ddpm import distributed
from ddpm.acceleration import make_denoiser
from ddpm.checkpoint import atomic_save
from ddpm.model import load_model
from ddpm.samplers import sample
from ddpm.training import to_uint8
from pipeline import system_metrics
from pipeline.common import progress, resolve_device, write_image_grid, write_json
from pipeline.params import for_stage, load_params
from pipeline.strip import StripRecorder


def main(params_path: Path, checkpoint: Path, sampler: str, steps: int, out_dir: Path, device: str) -> None:
    params = load_params(params_path)
    if sampler not in params.samplers:
        raise ValueError(f"sampler {sampler!r} is not defined under 'samplers' in {params_path} "
                         f"(defined: {', '.join(params.samplers)})")
    p = for_stage(params, "sample", sampler=sampler)
    system_metrics.settings()  # a bad MLFLOW_SYSTEM_METRICS_* variable fails here, before any work
    sp, cfg = p.sample, p.samplers[sampler]
    with distributed.process_group(resolve_device(device)) as (world, dev):
        net, spec, ckpt = load_model(checkpoint, dev)
        denoiser = make_denoiser(net, dev, precision=sp.precision, memory_format=sp.memory_format, compile=sp.compile)
        if not 1 <= steps <= spec.timesteps:
            raise ValueError(f"steps must be in [1, {spec.timesteps}] for {checkpoint}, got {steps}")
        diffusion = spec.build_diffusion(dev)
        options = cfg.model_dump(exclude={"kind"})
        mine = range(0, sp.num_samples, sp.batch_size)[world.rank::world.size]  # first image of each batch
        chunks = []
        start = time.perf_counter()
        system = out_dir / "system.json"  # written when sampling ends, before the other files
        total = sum(min(sp.batch_size, sp.num_samples - i) for i in mine) * steps  # rank 0 shows its share
        with system_metrics.record(system, enabled=world.is_main), \
                progress(total, f"sample {sampler}-{steps}", enabled=world.is_main) as bar:
            for i in mine:
                n = min(sp.batch_size, sp.num_samples - i)
                g = torch.Generator(device=dev).manual_seed(distributed.derive_seed(sp.seed, i // sp.batch_size))
                shape = (n, spec.channels, spec.image_size, spec.image_size)
                x_T = on_step = None
                if i == 0:  # the first batch also records the denoising strip (x_T drawn as sample() draws it)
                    x_T = torch.randn(shape, generator=g, device=dev)
                    on_step = strip = StripRecorder(x_T, steps)
                x = sample(denoiser, diffusion, shape, sampler=cfg.kind,
                           steps=steps, spacing=sp.spacing, prediction=spec.prediction, variance=spec.variance,
                           clip=sp.clip, percentile=sp.clip_percentile, generator=g, options=options,
                           progress=lambda k, n=n: bar(k * n), x_T=x_T, on_step=on_step)
                chunks.append((i, to_uint8(x).cpu()))
        gathered = distributed.gather(chunks, world)
        seconds = time.perf_counter() - start
        if world.is_main:
            images = torch.cat([x for _, x in sorted((c for part in gathered for c in part), key=lambda c: c[0])])
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_save({"images": images, "sampler": sampler, "steps": steps, "checkpoint_step": ckpt["step"]},
                        out_dir / "samples.pt")
            write_image_grid(out_dir / "grid.png", images[:64], nrow=8)
            strip.save(out_dir / "strip.png")  # batch 0 is always rank 0's
            write_json(out_dir / "info.json", {"sampler": sampler, "kind": cfg.kind, "options": options,
                                               "steps": steps, "num_samples": images.shape[0],
                                               "seconds": round(seconds, 2), "processes": world.size,
                                               "images_per_second": round(images.shape[0] / seconds, 2),
                                               "device": str(dev)})
            print(f"sample {sampler}-{steps}: {images.shape[0]} images in {seconds:.1f} s"
                  + (f" on {world.size} processes" if world.is_distributed else "") + f" → {out_dir}")
        distributed.barrier(world)
