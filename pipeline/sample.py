"""Stage `sample`: draw samples from the trained model with one sampler × step count
(one cell of the sample matrix) and write them as uint8 plus a PNG grid."""

import time
from pathlib import Path

import torch
from torchvision.utils import save_image

from ddpm.checkpoint import atomic_save
from ddpm.model import load_model
from ddpm.samplers import sample
from ddpm.training import to_uint8
from pipeline.common import progress, resolve_device, write_json
from pipeline.params import for_stage, load_params


def main(params_path: Path, checkpoint: Path, sampler: str, steps: int, out_dir: Path, device: str) -> None:
    params = load_params(params_path)
    if sampler not in params.samplers:
        raise ValueError(f"sampler {sampler!r} is not defined under 'samplers' in {params_path} "
                         f"(defined: {', '.join(params.samplers)})")
    p = for_stage(params, "sample", sampler=sampler)
    sp, cfg = p.sample, p.samplers[sampler]
    dev = resolve_device(device)
    net, spec, ckpt = load_model(checkpoint, dev)
    if not 1 <= steps <= spec.timesteps:
        raise ValueError(f"steps must be in [1, {spec.timesteps}] for {checkpoint}, got {steps}")
    diffusion = spec.build_diffusion(dev)
    options = cfg.model_dump(exclude={"kind"})
    g = torch.Generator(device=dev).manual_seed(sp.seed)
    chunks = []
    start = time.perf_counter()
    with progress(sp.num_samples * steps, f"sample {sampler}-{steps}") as bar:
        for i in range(0, sp.num_samples, sp.batch_size):
            n = min(sp.batch_size, sp.num_samples - i)
            x = sample(net, diffusion, (n, spec.channels, spec.image_size, spec.image_size), sampler=cfg.kind,
                       steps=steps, spacing=sp.spacing, prediction=spec.prediction, clip=sp.clip,
                       percentile=sp.clip_percentile, precision=sp.precision, generator=g, options=options,
                       progress=lambda k, n=n: bar(k * n))
            chunks.append(to_uint8(x).cpu())
    seconds = time.perf_counter() - start
    images = torch.cat(chunks)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save({"images": images, "sampler": sampler, "steps": steps, "checkpoint_step": ckpt["step"]},
                out_dir / "samples.pt")
    save_image(images[:64].float() / 255.0, out_dir / "grid.png", nrow=8, padding=2)
    write_json(out_dir / "info.json", {"sampler": sampler, "kind": cfg.kind, "options": options, "steps": steps,
                                       "num_samples": images.shape[0], "seconds": round(seconds, 2),
                                       "images_per_second": round(images.shape[0] / seconds, 2), "device": str(dev)})
    print(f"sample {sampler}-{steps}: {images.shape[0]} images in {seconds:.1f} s → {out_dir}")
