"""The benchmark in CI-sized form: tiny config, a few steps, CPU. Checks that it produces
every figure (no timed assertions) and that the peer has our parameter count."""

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from benchmarks.bench import MODEL_CONFIGS, BenchConfig, build_ours, build_peer, count_flops, run_benchmark
from benchmarks.cli import app

HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
SMALL = dict(model="tiny", device="cpu", batch_size=2, sample_batch_size=2, sample_steps=2, warmup=0, repeats=1, threads=1,
             iters=1, peak_flops=1e11)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def check_model(r: dict, samplers) -> None:
    assert r["available"] is True
    for key in ("parameters", "forward_flops_per_image", "train_flops_per_image"):
        assert positive(r[key]), key
    assert r["train_flops_per_image"] > 2 * r["forward_flops_per_image"]  # backward ≈ 2× forward
    assert positive(r["train"]["images_per_second"]) and positive(r["train"]["mfu"])
    assert r["train"]["best_images_per_second"] >= r["train"]["images_per_second"]
    assert r["train"]["peak_memory_bytes"] is None  # CUDA only
    for s in samplers:
        f = r["sample"][s]
        assert positive(f["images_per_second"]) and positive(f["mfu"])
        assert f["model_evaluations_per_second"] == pytest.approx(2 * f["images_per_second"])  # 2 steps


@pytest.mark.skipif(not HAVE_DIFFUSERS, reason="diffusers (the optional bench extra) is not installed")
def test_bench_with_peer():
    r = run_benchmark(BenchConfig(**SMALL))
    ours, peer = r["models"]["ours"], r["models"]["peer"]
    check_model(ours, ("ddpm", "ddim"))
    check_model(peer, ("ddpm", "ddim"))
    assert positive(ours["loop"]["images_per_second"])
    assert ours["parameters"] == peer["parameters"]
    assert ours["forward_flops_per_image"] == peer["forward_flops_per_image"]
    assert set(r["ratio_ours_over_peer"]) == {"train", "sample.ddpm", "sample.ddim"}
    assert all(positive(v) for v in r["ratio_ours_over_peer"].values())
    assert set(r["ratio_ours_over_peer_by_process_cpu_time"]) == set(r["ratio_ours_over_peer_best"]) == set(r["ratio_ours_over_peer"])
    assert r["peak_flops"] == {"value": 1e11, "source": "given by the user"}
    assert r["threads"] == 1 and r["settings"]["threads"] == 1
    json.dumps(r)


@pytest.mark.skipif(not HAVE_DIFFUSERS, reason="diffusers (the optional bench extra) is not installed")
@pytest.mark.parametrize("name", ["ddpm-cifar10", "fashion-mnist"])
def test_peer_matches_named_configs(name):
    m = MODEL_CONFIGS[name]
    ours = build_ours(m)
    peer = build_peer(m, ours)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in peer.parameters())
    if name == "ddpm-cifar10":
        assert round(n / 1e6, 1) == 35.7


def test_bench_without_peer(monkeypatch):
    """Without diffusers the bench still measures ours and says why the peer is missing."""
    import builtins

    real_import = builtins.__import__

    def no_diffusers(name, *args, **kwargs):
        if name == "diffusers" or name.startswith("diffusers."):
            raise ImportError("No module named 'diffusers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_diffusers)
    r = run_benchmark(BenchConfig(**{**SMALL, "samplers": ("ddim",)}))
    check_model(r["models"]["ours"], ("ddim",))
    assert r["models"]["peer"]["available"] is False
    assert "diffusers" in r["models"]["peer"]["reason"]
    assert r["ratio_ours_over_peer"] == {}


def test_cpu_attention_flops_are_counted():
    """The fused CPU attention kernel is counted: a config with attention has more FLOPs."""
    import torch

    from ddpm.unet import UNet, UNetConfig

    x, t = torch.randn(1, 1, 8, 8), torch.tensor([3])
    flops = [count_flops(lambda: UNet(UNetConfig(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=a),
                                      image_size=8, in_channels=1, out_channels=1)(x, t)) for a in ((), (8,))]
    # attn_resolutions=(8,) adds attention after 1 encoder and 2 decoder blocks: per block
    # q·kᵀ and softmax·v (2·hw²·c FLOPs each) plus the qkv and output projections (2·hw·c·4c)
    c, hw = 32, 64
    assert flops[1] - flops[0] == 3 * (2 * 2 * hw * hw * c + 2 * hw * c * 4 * c)


def test_bench_command_rejects_bad_choices():
    r = CliRunner().invoke(app, ["bench", "--config", "nope", "--device", "cpu"])
    assert r.exit_code == 1 and "ddpm-cifar10" in r.output
    r = CliRunner().invoke(app, ["bench", "--config", "tiny", "--device", "cpu", "--precision", "tf32"])
    assert r.exit_code == 1 and "needs a CUDA device" in r.output
    r = CliRunner().invoke(app, ["bench", "--config", "tiny", "--device", "cpu", "--precision", "fp16"])
    assert r.exit_code == 2 and all(f"'{p}'" in r.output for p in ("auto", "fp32", "tf32", "bf16"))
    r = CliRunner().invoke(app, ["bench", "--config", "tiny", "--device", "cpu", "--compile", "fast"])
    assert r.exit_code == 2 and all(c in r.output for c in ("none", "default", "max-autotune"))


def test_cpu_mfu_against_the_measured_matmul_rates():
    """Without a given peak, the CPU's fp32 and bf16 matmul rates are measured (per wall and per
    process CPU time) and MFU is reported against both clocks; bf16 runs on the CPU too, on small
    tensors only: the tiny model at batch 2, and products no larger than one that takes 50 ms (on a
    CPU without native bf16 a 2048² bf16 product takes 15–30 s)."""
    r = run_benchmark(BenchConfig(**{**SMALL, "peak_flops": None, "samplers": ("ddim",), "peer": "none",
                                     "precision": "bf16"}))
    rates = r["measured_matmul_flops"]
    assert all(positive(rates[clock][p]) for clock in ("wall", "process_cpu") for p in ("fp32", "bf16"))
    assert r["peak_flops"]["value"] == rates["wall"]["bf16"] and "bfloat16" in r["peak_flops"]["source"]
    ours = r["models"]["ours"]
    assert positive(ours["train"]["mfu_by_process_cpu_time"]) and positive(ours["sample"]["ddim"]["mfu_by_process_cpu_time"])
    assert r["settings"]["precision"] == "bf16"
    assert f"{rates['size']['bf16']}×{rates['size']['bf16']}" in r["peak_flops"]["source"]


def test_the_matmul_rate_is_measured_at_the_first_size_that_times_well(monkeypatch):
    """The product grows until one takes MATMUL_LONG seconds, so a slow CPU measures small products and a
    fast one stops at the largest size; the best of MATMUL_REPEATS counts."""
    import benchmarks.bench as bench

    monkeypatch.setattr(bench, "MATMUL_SIZES", (32, 64, 128))
    monkeypatch.setattr(bench, "MATMUL_LONG", 0.0)  # every product "takes long enough": the first size
    assert bench.measure_cpu_matmul("cpu", ("fp32",))["size"] == {"fp32": 32}
    monkeypatch.setattr(bench, "MATMUL_LONG", float("inf"))  # none does: up to the last size
    got = bench.measure_cpu_matmul("cpu", ("fp32", "bf16"))
    assert got["size"] == {"fp32": 128, "bf16": 128}
    assert all(got[clock][p] > 0 for clock in ("wall", "process_cpu") for p in ("fp32", "bf16"))


def test_every_benchmark_module_imports():
    """The commands import their module only when they run: an import that breaks (a helper moved
    away from another module) would show only then. Import them all here."""
    import importlib
    import pkgutil

    import benchmarks

    names = [m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name != "__main__"]
    assert {"bench", "gpu_check", "gpu_parts", "overhead", "proxies", "cli"} <= set(names)
    for name in names:
        importlib.import_module(f"benchmarks.{name}")


def test_overhead_command_reads_its_sets_before_any_work():
    """`benchmarks overhead` parses its --set options with gpu_check's parser (it once failed on import,
    the parser having moved away): a bad one is one error line, before any pipeline runs."""
    r = CliRunner().invoke(app, ["overhead", "--set", "no-equals-sign"])
    assert r.exit_code == 1 and "--set takes key=value, got 'no-equals-sign'" in r.output
