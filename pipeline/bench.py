"""Command `bench` (not a DVC stage): the side-by-side benchmark of ``ddpm.bench``,
printed as JSON (and written to ``--out`` when given). Options left out take defaults
for the device: the GPU fast path (bf16, channels_last, torch.compile, batch 128) on
CUDA, plain fp32 and small batches on CPU."""

import json
from pathlib import Path

from ddpm.bench import BenchConfig, run_benchmark
from pipeline.common import resolve_device, write_json

# (CUDA, CPU) defaults for the options left out
DEFAULTS = {"batch_size": (128, 8), "sample_batch_size": (512, 8), "warmup": (5, 1), "repeats": (5, 3),
            "iters": (10, 1), "precision": ("bf16", "fp32"), "memory_format": ("channels_last", "contiguous"),
            "compile": ("default", "none")}


def config_from_options(*, config: str, device: str, samplers: str, peak_tflops: float | None, **options) -> BenchConfig:
    dev = resolve_device(device)
    for name, value in options.items():
        if name in DEFAULTS and value in (None, "auto"):
            options[name] = DEFAULTS[name][0 if dev.type == "cuda" else 1]
    return BenchConfig(model=config, device=str(dev), samplers=tuple(s.strip() for s in samplers.split(",") if s.strip()),
                       peak_flops=None if peak_tflops is None else peak_tflops * 1e12, **options)


def main(cfg: BenchConfig, out: Path | None) -> dict:
    result = run_benchmark(cfg)
    if out is not None:
        write_json(out, result)
    print(json.dumps(result, indent=2))
    return result
