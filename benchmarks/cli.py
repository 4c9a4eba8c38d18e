"""The benchmark commands (not DVC stages): ``python -m benchmarks bench`` and
``python -m benchmarks gpu-check`` and ``python -m benchmarks overhead``.

``bench`` runs the side-by-side benchmark of ``benchmarks.bench``, printed as JSON (and
written to ``--out`` when given). Options left out take defaults for the device: the GPU
fast path (``ddpm.acceleration``'s ``auto``: bf16, channels_last, torch.compile) and batch
128 on CUDA, plain fp32 and small batches on CPU. ``gpu-check`` is ``benchmarks.gpu_check``,
``overhead`` is ``benchmarks.overhead``.
"""

import json
from enum import Enum
from pathlib import Path

import typer

from ddpm.config.fast_path import COMPILE_MODES, MEMORY_FORMATS, PRECISIONS
from pipeline.stages._cli import DEBUG, DEVICE, FORCED, keep_freed_memory, one_line

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Benchmarks of the DDPM pipeline (not DVC stages).")


def clear_errors(fn):
    """The project's errors as one line (``pipeline.stages._cli.one_line``), for a command of this app."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return one_line(fn)(*args, **kwargs)

    return wrapper


@app.callback()
def _process(debug: bool = DEBUG) -> None:
    """Before any command: the allocator keeps freed memory, as in the pipeline's stages."""
    FORCED["debug"] = debug
    keep_freed_memory()


# the library's choices, as Click choices (a bad value is a usage error naming them)
Precision = Enum("Precision", {p: p for p in PRECISIONS}, type=str)
MemoryFormat = Enum("MemoryFormat", {m: m for m in MEMORY_FORMATS}, type=str)
Compile = Enum("Compile", {c: c for c in COMPILE_MODES}, type=str)

# (CUDA, CPU) defaults for the options left out
DEFAULTS = {"batch_size": (128, 8), "sample_batch_size": (512, 8), "warmup": (5, 1), "repeats": (5, 3),
            "iters": (10, 1)}


def config_from_options(*, config: str, device: str, samplers: str, peak_tflops: float | None, **options):
    from benchmarks.bench import BenchConfig
    from pipeline.device import resolve_device

    dev = resolve_device(device)
    for name, value in options.items():
        if name in DEFAULTS and value is None:
            options[name] = DEFAULTS[name][0 if dev.type == "cuda" else 1]
    return BenchConfig(model=config, device=str(dev), samplers=tuple(s.strip() for s in samplers.split(",") if s.strip()),
                       peak_flops=None if peak_tflops is None else peak_tflops * 1e12, **options)


@app.command()
@clear_errors
def bench(config: str = typer.Option("ddpm-cifar10", help="model config: ddpm-cifar10 | fashion-mnist | tiny"),
          device: str = DEVICE,
          batch_size: int = typer.Option(None, help="training batch (default 128 on CUDA, 8 on CPU)"),
          sample_batch_size: int = typer.Option(None, help="sampling batch (default 512 on CUDA, 8 on CPU)"),
          sample_steps: int = typer.Option(10, help="sampling steps per measured sample() call"),
          samplers: str = typer.Option("ddpm,ddim", help="comma-separated samplers"),
          warmup: int = typer.Option(None, help="untimed iterations (default 5 on CUDA, 1 on CPU)"),
          repeats: int = typer.Option(None, help="timed rounds, median reported (default 5 on CUDA, 3 on CPU)"),
          iters: int = typer.Option(None, help="iterations per timed round (default 10 on CUDA, 1 on CPU)"),
          precision: Precision = typer.Option("auto", help="auto: bf16 on CUDA, fp32 on CPU"),
          memory_format: MemoryFormat = typer.Option("auto", help="auto: channels_last on CUDA"),
          compile: Compile = typer.Option("auto", help="auto: default on CUDA, none on CPU"),
          peak_tflops: float = typer.Option(None, help="peak TFLOP/s for MFU (default datasheet for known GPUs, "
                                                       "the measured matmul rate of the precision on CPU)"),
          peer: str = typer.Option("diffusers", help="diffusers | none"),
          threads: int = typer.Option(None, help="PyTorch CPU threads (default PyTorch's)"),
          out: Path = typer.Option(None, help="also write the JSON here")):
    """Benchmark training and sampling of our U-Net against diffusers' UNet2DModel (JSON)."""
    from benchmarks.bench import run_benchmark
    from pipeline.outputs import write_json

    result = run_benchmark(config_from_options(
        config=config, device=device, batch_size=batch_size, sample_batch_size=sample_batch_size,
        sample_steps=sample_steps, samplers=samplers, warmup=warmup, repeats=repeats, iters=iters,
        precision=precision.value, memory_format=memory_format.value, compile=compile.value, peak_tflops=peak_tflops, peer=peer,
        threads=threads))
    if out is not None:
        write_json(out, result)
    print(json.dumps(result, indent=2))


@app.command("gpu-check")
def gpu_check(out: Path = typer.Option(Path("gpu-check"), help="folder for its files (a report already there is kept as gpu_check.previous.json)"),
              dry_run: bool = typer.Option(False, "--dry-run", help="tiny sizes on the CPU, the CUDA-only parts skipped "
                                                                    "and named: the code paths in about a minute"),
              device: str = DEVICE,
              set_: list[str] = typer.Option([], "--set", help="override a param of the experiment, key=value "
                                                             "(YAML value; repeatable), e.g. data.root=/data"),
              data: str = typer.Option(None, help="data.root of the experiment (default: params.yaml's)"),
              ddp_processes: int = typer.Option(None, help="processes of the ddp part (default: the number of "
                                                          "GPUs when more than one, else the part is skipped)"),
              budget: float = typer.Option(None, help="seconds for the whole check (default 470)"),
              parts: str = typer.Option(None, help="comma-separated parts or their prefixes (stage, train, warm, ...)"),
              carry: Path = typer.Option(None, help="an earlier gpu_check.json whose figures the projection falls "
                                                    "back on (default: the H200's of 2026-12-04)")):
    """The GPU figures in one run of at most 8 minutes (also `python3 -m benchmarks gpu-check` without typer): parts
    in order of value, each within its own budget and written down as measured; the projected default `dvc repro`."""
    from benchmarks.gpu_check import cli

    argv = ["--out", str(out), "--device", device] + (["--dry-run"] if dry_run else [])
    argv += [a for s in set_ for a in ("--set", s)] + (["--data", data] if data else [])
    argv += (["--ddp-processes", str(ddp_processes)] if ddp_processes is not None else [])
    argv += (["--budget", str(budget)] if budget is not None else []) + (["--parts", parts] if parts else [])
    argv += (["--carry", str(carry)] if carry is not None else [])
    cli(argv)


@app.command()
def proxies(config: str = typer.Option("fashion-mnist", help="model config: ddpm-cifar10 | fashion-mnist | tiny"),
            out: Path = typer.Option(None, help="also write the JSON here")):
    """CPU proxies of the GPU's launch overhead: aten ops dispatched per training and per sampling step, and
    the casts of a sampling step, at fp32 and bf16 (the same on any machine)."""
    from benchmarks.bench import MODEL_CONFIGS
    from benchmarks.proxies import proxies as count
    from pipeline.outputs import write_json

    m = MODEL_CONFIGS[config]
    result = {"config": config, **count(m.unet, m.image_size, m.channels)}
    if out is not None:
        write_json(out, result)
    for precision, r in result.items():
        if precision != "config":
            print(f"{config} {precision}: {r['train']['ops_per_step']:.0f} ops per training step, "
                  f"{r['sample']['ops_per_step']:.0f} per sampling step, {r['sample']['casts_per_step']:.0f} casts "
                  f"per sampling step")
    print(json.dumps(result, indent=2))


@app.command()
@clear_errors
def overhead(repo: Path = typer.Option(Path("."), help="the repository whose pipeline to measure"),
             repeats: int = typer.Option(3, help="fresh processes per import timing (median)"),
             set_: list[str] = typer.Option([], "--set", help="override a param, key=value (YAML value; repeatable)"),
             work: str = typer.Option("zero", help="zero (start-up only) | cpu-preset (the CPU preset itself)"),
             out: Path = typer.Option(None, help="also write the JSON here")):
    """The pipeline's fixed overhead: each stage's start-up and DVC's share, from a zero-work `dvc exp run`."""
    from benchmarks import overhead as command
    from benchmarks.gpu_check import parse_sets

    command.main(out, repo.resolve(), repeats, parse_sets(set_), work)
