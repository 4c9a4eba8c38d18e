"""Stage `sample`: draw samples from the trained model with one sampler × step count
(one cell of the sample matrix) and write them as uint8 plus a PNG grid. ``sample.weights``
picks the checkpoint's averaged (``ema``) or raw weights; ``info.json`` records which, and
which average (the checkpoint's ``ema_config``).

A class-conditional model samples a class-balanced set (image i has class i mod K),
saves the labels with the images, and draws its grid per class (row k: class k). With
``--guidance NAME`` (stage `sample_guided`) it is guided by the setting ``guidance.NAME``;
without, it is the conditional model itself (w = 0).

Batch i of ``sample.batch_size`` images draws from its own generator, seeded with
``derive_seed(sample.seed, i)``, so the samples do not depend on how the batches are
spread: under ``torchrun`` rank r samples batches r, r+N, r+2N, … and rank 0 gathers
them and writes the files (all at the end, into a new folder that then replaces ``--out`` whole: a
kill or a full disk leaves the old cell or the new one, never a mix). The weights are checked finite
when loaded (``ddpm.model.load_model``) and each batch of images before its uint8 cast (NaN would
become black pixels): either refuses the cell in one line, and the old cell stays."""

import time
from contextlib import nullcontext
from pathlib import Path

import torch
import typer

from ddpm import distributed
from ddpm.acceleration import make_denoiser
from ddpm.config.sampling import Guidance
from ddpm.errors import InputError, NonFiniteError
from ddpm.files import atomic_folder, atomic_save
from ddpm.guidance import balanced_labels
from ddpm.model import load_model
from ddpm.pixels import to_uint8
from ddpm.samplers import sample
from pipeline.device import resolve_device
from pipeline.launch import data_parallel
from pipeline.images import StripRecorder, write_image_grid
from pipeline.outputs import check_writable, write_json
from pipeline.params import base, guidance as guidance_section, sample as sample_section, samplers
from pipeline.progress import progress
from pipeline.stages._cli import DEVICE, PARAMS, stage, stage_app
from pipeline.tracking import system_metrics
from pipeline.workspace import repo_root

KEYS = ["sample.num_samples", "sample.batch_size", "sample.spacing", "sample.clip", "sample.clip_percentile",
        "sample.precision", "sample.memory_format", "sample.compile", "sample.seed", "sample.weights",
        "samplers.${item.sampler}"]
STAGE_KEYS = {"sample": KEYS, "sample_guided": KEYS + ["guidance.${item.guidance}"]}  # dvc.yaml's two stages

app = stage_app()


def ema_summary(ckpt: dict) -> dict:
    """The scalar entries of the checkpoint's ``ema_config`` (source, kind, σ_rel or decay, ...)."""
    return {k: v for k, v in (ckpt.get("ema_config") or {}).items() if not isinstance(v, (list, dict))}


def class_grid(images: torch.Tensor, labels: torch.Tensor, num_classes: int, per_class: int = 8) -> torch.Tensor:
    """Up to ``per_class`` images of each class, class k in row k (blank where a class has fewer)."""
    per = max(1, min(per_class, images.shape[0] // num_classes))
    rows = []
    for k in range(num_classes):
        mine = images[labels == k][:per]
        rows.append(torch.cat([mine, mine.new_zeros((per - mine.shape[0], *images.shape[1:]))]))
    return torch.cat(rows)


def stage_params(params_path: Path, sampler: str, guidance: str | None):
    """The params of stage `sample` (or `sample_guided`, with ``guidance``) and the guidance setting;
    a sampler or guidance name not defined in params fails."""
    sections = (sample_section, samplers) + ((guidance_section,) if guidance is not None else ())
    name = "sample" if guidance is None else "sample_guided"
    raw = base.validate(base.read_yaml(params_path), base.schema("SampleParams", *sections), str(params_path),
                        whole=False)
    if sampler not in raw.samplers:  # (the names defined: for the message; the cell reads its own alone)
        raise InputError(f"sampler {sampler!r} is not defined under 'samplers' in {params_path} "
                         f"(defined: {', '.join(raw.samplers)})")
    if guidance is not None and guidance not in raw.guidance:
        raise InputError(f"guidance {guidance!r} is not defined under 'guidance' in {params_path} "
                         f"(defined: {', '.join(raw.guidance) or 'none'})")
    if guidance is None:
        return base.for_stage(raw, STAGE_KEYS[name], name, sampler=sampler), Guidance()
    p = base.for_stage(raw, STAGE_KEYS[name], name, sampler=sampler, guidance=guidance)
    return p, Guidance(**p.guidance[guidance].model_dump()).check()


def check_model(spec, checkpoint: Path, steps: int, guidance: str | None) -> None:
    """Refuse a step count outside the model's timesteps, and guidance for an unconditional model."""
    if not 1 <= steps <= spec.timesteps:
        raise InputError(f"steps must be in [1, {spec.timesteps}] for {checkpoint}, got {steps}")
    if guidance is not None and spec.conditioning != "class":
        raise InputError(f"--guidance {guidance}: the model in {checkpoint} is unconditional (conditioning: "
                         f"{spec.conditioning}); guidance needs one trained with conditioning: class")


def batches(sp, world) -> list[tuple[int, int]]:
    """(first image, size) of each batch this rank samples: batch b goes to rank b mod the world size."""
    return [(i, min(sp.batch_size, sp.num_samples - i))
            for i in range(0, sp.num_samples, sp.batch_size)[world.rank::world.size]]


def check_images(x: torch.Tensor, first: int, batch_size: int) -> None:
    """``NonFiniteError`` unless the sampled batch ``x`` is finite: uint8 stores NaN as 0 (black) and ∞ as
    a saturated pixel, which `fid` would score like any other image."""
    bad = int((~x.isfinite()).sum())
    if bad:
        raise NonFiniteError(f"the samples are not finite: {bad} of {x.numel()} values of batch "
                             f"{first // batch_size} (images {first}–{first + x.shape[0] - 1}) are NaN or infinite, "
                             "which uint8 would store as black or saturated pixels; nothing is written")


def draw(denoiser, diffusion, spec, sp, cfg, steps: int, guide: Guidance, mine, dev, bar):
    """Sample this rank's batches ``mine``: [(first image, uint8 images, labels)], and the strip of
    batch 0 (None when this rank does not sample it)."""
    K = spec.num_classes
    options = cfg.model_dump(exclude={"kind"})
    chunks, strip = [], None
    for i, n in mine:
        g = torch.Generator(device=dev).manual_seed(distributed.derive_seed(sp.seed, i // sp.batch_size))
        shape = (n, spec.channels, spec.image_size, spec.image_size)
        x_T = on_step = None
        if i == 0:  # the first batch also records the denoising strip (x_T drawn as sample() draws it)
            x_T = torch.randn(shape, generator=g, device=dev)
            on_step = strip = StripRecorder(x_T, steps)
        y = balanced_labels(n, K, start=i, device=dev) if K else None  # image i has class i mod K
        x = sample(denoiser, diffusion, shape, sampler=cfg.kind,
                   steps=steps, spacing=sp.spacing, prediction=spec.prediction, variance=spec.variance,
                   clip=sp.clip, percentile=sp.clip_percentile, generator=g, options=options,
                   progress=lambda k, n=n: bar(k * n), x_T=x_T, on_step=on_step,
                   labels=y, null_label=K, guidance=guide)
        check_images(x, i, sp.batch_size)
        chunks.append((i, to_uint8(x).cpu(), None if y is None else y.cpu()))
    return chunks, strip


def write_outputs(out: Path, gathered, strip, *, sampler: str, cfg, steps: int, sp, spec, ckpt,
                  guidance: str | None, guide: Guidance, run: dict) -> torch.Tensor:
    """Write samples.pt, grid.png, strip.png and info.json from all ranks' batches; the images."""
    K = spec.num_classes
    ordered = sorted((c for part in gathered for c in part), key=lambda c: c[0])
    images = torch.cat([x for _, x, _ in ordered])
    labels = torch.cat([y for _, _, y in ordered]) if K else None
    out.mkdir(parents=True, exist_ok=True)
    conditioning = {} if not K else {"labels": labels, "classes": list(spec.classes), "guidance": guidance,
                                     "w": guide.w}
    atomic_save({"images": images, "sampler": sampler, "steps": steps, "checkpoint_step": ckpt["step"],
                 **conditioning}, out / "samples.pt")
    if K:  # one row per class
        grid = class_grid(images, labels, K)
        write_image_grid(out / "grid.png", grid, nrow=grid.shape[0] // K)
    else:
        write_image_grid(out / "grid.png", images[:64], nrow=8)
    strip.save(out / "strip.png")  # batch 0 is always rank 0's
    guided = {} if not K else {"guidance": guidance, "w": guide.w, "rescale": guide.rescale,
                               "interval": None if guide.interval is None else list(guide.interval)}
    seconds, options = run["seconds"], cfg.model_dump(exclude={"kind"})
    write_json(out / "info.json", {"sampler": sampler, "kind": cfg.kind, "options": options,
                                       "steps": steps, "num_samples": images.shape[0],
                                       "weights": sp.weights, "ema": ema_summary(ckpt),
                                       "seconds": round(seconds, 2), "processes": run["processes"],
                                       "images_per_second": round(images.shape[0] / seconds, 2),
                                       "device": run["device"], "path": run["path"], "started_ms": run["started_ms"],
                                       "ended_ms": int(time.time() * 1000), **guided})
    return images


@app.command()
@stage
def main(params: Path = PARAMS,
         checkpoint: Path = typer.Option(Path("models/model_ema.pt"), help="the ema stage's checkpoint"),
         sampler: str = typer.Option(..., help="a sampler name defined under 'samplers' in params"),
         steps: int = typer.Option(..., help="number of sampling steps"),
         out: Path = typer.Option(..., help="folder for samples.pt, grid.png, strip.png, info.json, system.json"),
         guidance: str = typer.Option(None, help="a classifier-free guidance setting defined under 'guidance' "
                                                 "(class-conditional models; default: none, w = 0)"),
         device: str = DEVICE):
    """Sample one cell of the sampler × steps (× guidance) matrix (sample.*, samplers.<name>, guidance.<name>);
    sample.weights: ema | raw."""
    data_parallel(device, repo_root())  # every GPU of the node (or this experiment's share): DDP
    started_ms = int(time.time() * 1000)
    p, guide = stage_params(params, sampler, guidance)
    system_metrics.settings()  # a bad MLFLOW_SYSTEM_METRICS_* variable fails here, before any work
    sp, cfg = p.sample, p.samplers[sampler]
    check_writable(*(out / f for f in ("samples.pt", "grid.png", "strip.png", "info.json", "system.json")))
    cell = f"{sampler}-{steps}" + (f"-{guidance}" if guidance else "")
    with distributed.process_group(resolve_device(device)) as (world, dev):
        net, spec, ckpt = load_model(checkpoint, dev, weights=sp.weights)
        check_model(spec, checkpoint, steps, guidance)
        diffusion = spec.build_diffusion(dev)
        mine = batches(sp, world)
        evaluations = sum(n for _, n in mine) * steps * (2 if cfg.kind == "heun" else 1) * (2 if guidance else 1)
        denoiser = make_denoiser(net, dev, precision=sp.precision, memory_format=sp.memory_format, compile=sp.compile,
                                 work=evaluations)
        start = time.perf_counter()
        total = sum(n for _, n in mine) * steps  # rank 0 shows its share
        # the cell is one unit: its files are written into a new folder that replaces out whole
        with atomic_folder(out) if world.is_main else nullcontext(out) as cell_dir:
            system = cell_dir / "system.json"  # written when sampling ends, before the other files
            with system_metrics.record(system, enabled=world.is_main), \
                    progress(total, f"sample {cell}", enabled=world.is_main) as bar:
                chunks, strip = draw(denoiser, diffusion, spec, sp, cfg, steps, guide, mine, dev, bar)
            gathered = distributed.gather(chunks, world)
            seconds = time.perf_counter() - start
            if world.is_main:
                images = write_outputs(cell_dir, gathered, strip, sampler=sampler, cfg=cfg, steps=steps, sp=sp,
                                       spec=spec, ckpt=ckpt, guidance=guidance, guide=guide,
                                       run={"seconds": seconds, "processes": world.size, "device": str(dev),
                                            "path": denoiser.path, "started_ms": started_ms})
        if world.is_main:
            print(f"sample {cell}: {images.shape[0]} images in {seconds:.1f} s"
                  + (f" on {world.size} processes" if world.is_distributed else "") + f" → {out}")
        distributed.barrier(world)


if __name__ == "__main__":
    app()
