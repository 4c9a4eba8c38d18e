"""The measuring parts of ``gpu-check`` (``benchmarks.gpu_check``), each run as its own process:
``python3 -m benchmarks.gpu_parts PART --out DIR [--size gpu|ci] [--device cuda]``.

Each figure goes to ``DIR/gpu_check.json`` and the table ``DIR/gpu_check.md`` the moment it is
measured (``gpu_check.record``): a part killed at its time limit, or a check killed whole, leaves
every figure measured before. A measurement that fails is recorded as its error, and the next one
runs. Needs only torch and numpy (and diffusers for the peer parts): no typer, pydantic, DVC or
MLflow, so it runs on a bare GPU machine with the system Python.

  train.MODE           ``ddpm.training.train`` on the default config (the U-Net of params.yaml,
                       batch 128, the power EMA and two post-hoc profiles, clipping, warm-up) with
                       compile MODE: seconds of the first steps (compile, capture), steady img/s,
                       MFU, peak memory, the path that ran. ``train.none`` also records torch.profiler's
                       host and GPU ms per step (``profile.none``) and the EMA update alone
  profile.MODE         torch.profiler over 10 training steps of compile MODE (compiled first)
  sample.MODE          ``ddpm.samplers.sample`` (ddim, 10 steps) at batch 1000, bf16 weights cast
                       once, compile MODE; ``sample.autocast``: float32 weights under autocast (the old path)
  likelihood.MODE      the same in float32: the rate of the bound's evaluations (``nll``'s path)
  warm.train           a fresh process with inductor's cache warm (after train.reduce-overhead): where a
  warm.sample          stage process's seconds before its first result go (imports, dynamo, AOTAutograd
                       and inductor's caches, the first calls: CUDA graph recording), from torch's own
                       compile timers and cache counters
  peer.eager           ours against diffusers' UNet2DModel of the same architecture, training eager
  peer.compiled        and sampling on CUDA graphs; then both compiled (reduce-overhead)
"""

import argparse
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.bench import MODEL_CONFIGS, PEAK_FLOPS, build_ours, model_flops
from benchmarks.gpu_check import record

# per size: the model config, batch sizes, timed seconds per measurement
SIZES = {
    "gpu": {"model": "fashion-mnist", "batch_size": 128, "sample_batch": 1000, "sample_steps": 10, "images": 8192,
            "seconds": 3.0, "profile_steps": 10, "warmup_steps": 10, "timed_first": 20, "warm_steps": 5,
            "ema_updates": 50},
    "ci": {"model": "tiny", "batch_size": 4, "sample_batch": 4, "sample_steps": 2, "images": 64,
           "seconds": 0.2, "profile_steps": 2, "warmup_steps": 1, "timed_first": 2, "warm_steps": 3,
           "ema_updates": 3},
}


class Recorder:
    """Puts each figure (or the error that stopped it) into the check's report as it is measured."""

    def __init__(self, out: Path):
        self.out = out

    def measure(self, key: str, fn) -> dict:
        start = time.perf_counter()
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 — a failed measurement is a result, the next one runs
            value = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}",
                     "traceback": traceback.format_exc()[-2000:]}
        value = {**value, "part_seconds": round(time.perf_counter() - start, 2)}
        record(self.out, key, value)
        print(f"gpu-check: {key}: {str(value)[:300]}", flush=True)
        return value


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((table["bf16"] for key, table in PEAK_FLOPS if key in name), None)


def native_bf16(device) -> bool:
    """Whether ``device`` runs bfloat16 matmuls and convolutions natively: CUDA, or a CPU whose oneDNN
    has bf16 instructions (AVX-512 BF16, AMX). Without them a bf16 product runs about 100× slower
    than in float32 (``ONEDNN_MAX_CPU_ISA=AVX2`` imitates such a CPU)."""
    if torch.device(device).type == "cuda":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fast_precision(device) -> str:
    """bf16, the fast path's precision, where the device has it natively; else fp32 (a dry run on
    such a CPU takes the same code paths in float32)."""
    return "bf16" if native_bf16(device) else "fp32"


def peak_memory(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else None


def reset_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def steady(run, units: float, seconds: float, device, first: int = 5) -> dict:
    """``run(n)`` timed: n = ``first``, then as many as fill ``seconds``; per-unit seconds and rate."""
    sync(device)
    start = time.perf_counter()
    run(first)
    sync(device)
    per = (time.perf_counter() - start) / first
    n = max(first, min(5000, int(seconds / max(per, 1e-6))))
    start = time.perf_counter()
    run(n)
    sync(device)
    per = (time.perf_counter() - start) / n
    return {"seconds_per_call": per, "per_second": units / per, "calls": n}


def compile_breakdown() -> dict:
    """Where this process's compile time went, from torch's own timers (``dynamo_timed``: seconds per
    phase, summed) and counters (cache hits, misses and bypasses of AOTAutograd and inductor, graphs)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics, counters
    except ImportError:
        return {}
    times = sorted(((k, sum(v)) for k, v in compilation_time_metrics.items()), key=lambda kv: -kv[1])
    return {"phases_seconds": {k: round(v, 3) for k, v in times[:16]},
            "counters": {group: dict(counters[group]) for group in ("aot_autograd", "inductor", "stats")
                         if counters.get(group)}}


# --------------------------------------------------------------------------- train
class Training:
    """The default config's training, per compile mode, on random images of its shape."""

    def __init__(self, size: dict, device: str):
        from ddpm.diffusion import Diffusion

        self.size, self.m, self.dev = size, MODEL_CONFIGS[size["model"]], torch.device(device)
        self.d = Diffusion.from_schedule("linear", 1000, device=self.dev)
        m = self.m
        self.images = torch.randint(0, 256, (size["images"], m.channels, m.image_size, m.image_size),
                                    dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(self.dev)
        self.peak = peak_flops(self.dev)  # None on a CPU: no MFU, no FLOPs counted
        self.flops = model_flops(build_ours(m).to(self.dev), m, self.dev)[1] if self.peak else None

    def state(self, mode: str):
        from ddpm.training import TrainConfig, init_state, train

        torch.manual_seed(0)
        cfg = TrainConfig(steps=0, batch_size=self.size["batch_size"], compile=mode, precision="auto",
                          memory_format="auto")
        state = init_state(build_ours(self.m), cfg, 0, self.dev)
        return state, lambda n: train(state, self.d, self.images, replace(cfg, steps=state.step + n))

    def rate(self, mode: str) -> tuple[dict, tuple]:
        """Seconds of the first 3 steps (compile, capture), then the steady rate."""
        size, dev = self.size, self.dev
        state, run = self.state(mode)
        reset_memory(dev)
        sync(dev)
        start = time.perf_counter()
        run(3)
        sync(dev)
        first = time.perf_counter() - start
        run(size["warmup_steps"])  # CUDA graph trees record on the first calls after warm-up
        r = steady(run, size["batch_size"], size["seconds"], dev, first=size["timed_first"])
        ips = r["per_second"]
        return {"images_per_second": ips, "steps_per_second": ips / size["batch_size"],
                "first_3_steps_seconds": first, "compile_seconds": max(0.0, first - 3 * r["seconds_per_call"]),
                "mfu": self.flops * ips / self.peak if self.peak else None, "peak_memory_bytes": peak_memory(dev),
                "path": state.path, "steps_timed": r["calls"], "model": size["model"],
                "batch_size": size["batch_size"]}, (state, run)


def train_part(rec: Recorder, size: dict, device: str, mode: str) -> None:
    t = Training(size, device)
    kept = {}

    def measure():
        figures, kept["run"] = t.rate(mode)
        return figures

    rec.measure(f"train.{mode}", measure)
    if mode == "none":  # eager: its profile and the EMA update's cost, cheap and never compiled
        if "run" in kept:
            rec.measure("profile.none", lambda: profile(*kept["run"], size["profile_steps"], t.dev, rec.out, "none"))
        rec.measure("ema_update", lambda: ema_update_cost(t.m, t.dev, size["ema_updates"]))


def profile_part(rec: Recorder, size: dict, device: str, mode: str) -> None:
    t = Training(size, device)

    def measure():
        figures, (state, run) = t.rate(mode)
        return {**profile(state, run, size["profile_steps"], t.dev, rec.out, mode),
                "first_3_steps_seconds": figures["first_3_steps_seconds"], "path": figures["path"]}

    rec.measure(f"profile.{mode}", measure)


def profile(state, run, steps: int, device, out: Path, mode: str) -> dict:
    """torch.profiler over ``steps`` training steps: host (self CPU) and GPU (self device) milliseconds
    and kernel launches (incl. CUDA graph launches) per step; the top of both tables appended to
    ``out/profile.txt``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    sync(device)
    start = time.perf_counter()
    with torch_profile(activities=activities, acc_events=True) as prof:
        run(steps)
        sync(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    host = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    # device time of the device's own events only (kernels, copies): a CPU op's self device time repeats its kernels'
    gpu = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e3 / steps
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                                                         "cuLaunchKernelEx", "cudaGraphLaunch")) / steps
    graphs = sum(e.count for e in events if e.key == "cudaGraphLaunch") / steps
    text = events.table(sort_by="self_cpu_time_total", row_limit=15)
    if gpu:
        text += "\n\n" + events.table(sort_by="self_device_time_total", row_limit=15)
    with open(out / "profile.txt", "a") as f:
        f.write(f"== {mode}: {steps} training steps\n{text}\n\n")
    return {"host_ms_per_step": host, "gpu_ms_per_step": gpu, "wall_ms_per_step_under_profiler": wall * 1e3 / steps,
            "launches_per_step": launches, "graph_launches_per_step": graphs, "steps": steps}


def ema_update_cost(m, device, updates: int) -> dict:
    """ms per step of updating the EMA and two profiles: 3 × ``AveragedModel.update_parameters`` (what
    training did) against one ``Averages.update``."""
    from ddpm.ema import Averages, PowerEMA, averaged_model

    net = build_ours(m).to(device)
    configs = [PowerEMA(sigma_rel=s) for s in (0.10, 0.05, 0.10)]
    old = [averaged_model(net, c) for c in configs]
    new = Averages(net, [(averaged_model(net, c), c) for c in configs])
    out = {}
    for name, fn in (("averaged_model_x3", lambda: [a.update_parameters(net) for a in old]), ("averages", new.update)):
        for _ in range(3):
            fn()
        sync(device)
        start = time.perf_counter()
        for _ in range(updates):
            fn()
        sync(device)
        out[f"{name}_ms"] = (time.perf_counter() - start) / updates * 1e3
    return out


# --------------------------------------------------------------------------- sample
def denoiser_for(m, dev, mode: str, precision: str = "bf16"):
    """(denoiser, path): the network as a sampler calls it on the path ``mode`` (``autocast``: float32
    weights under bf16 autocast, what sampling did before the weights were cast once)."""
    from ddpm.acceleration import make_denoiser, network, prepare_model, to_memory_format

    torch.manual_seed(0)
    net = build_ours(m)
    if mode == "autocast":
        net = prepare_model(net, dev, precision="bf16", memory_format="channels_last").eval()
        fwd = network(net, "bf16", dev)
        memory_format = "channels_last" if dev.type == "cuda" else "contiguous"
        return (lambda x, t: fwd(to_memory_format(x, memory_format), t)), "bf16 autocast on float32 weights, eager"
    denoiser = make_denoiser(net, dev, precision=precision, compile=mode)
    return denoiser, None


def sample_part(rec: Recorder, size: dict, device: str, mode: str, role: str = "sample") -> None:
    """ddim at ``sample_steps`` steps, batch ``sample_batch``: bf16 (``sample``) or float32 (``likelihood``)."""
    from ddpm.diffusion import Diffusion
    from ddpm.samplers import sample

    m, dev = MODEL_CONFIGS[size["model"]], torch.device(device)
    d = Diffusion.from_schedule("linear", 1000, device=dev)
    shape = (size["sample_batch"], m.channels, m.image_size, m.image_size)
    steps = size["sample_steps"]

    def measure() -> dict:
        peak = peak_flops(dev)  # None on a CPU: no MFU, no FLOPs counted
        forward_flops = model_flops(build_ours(m).to(dev), m, dev)[0] if peak else None
        denoiser, path = denoiser_for(m, dev, mode, precision="fp32" if role == "likelihood" else fast_precision(dev))
        g = torch.Generator(device=dev).manual_seed(0)
        reset_memory(dev)
        run = lambda n: [sample(denoiser, d, shape, sampler="ddim", steps=steps, generator=g) for _ in range(n)]  # noqa: E731
        sync(dev)
        start = time.perf_counter()
        run(1)
        sync(dev)
        first = time.perf_counter() - start
        r = steady(run, shape[0] * steps, size["seconds"], dev, first=2)
        rate = r["per_second"]
        return {"image_steps_per_second": rate, "first_call_seconds": first,
                "compile_seconds": max(0.0, first - r["seconds_per_call"]),
                "mfu": forward_flops * rate / peak if peak else None, "peak_memory_bytes": peak_memory(dev),
                "path": path or denoiser.path, "calls_timed": r["calls"], "sampler": "ddim", "steps": steps,
                "batch_size": shape[0]}

    rec.measure(f"{role}.{mode}", measure)


# --------------------------------------------------------------------------- warm start
def warm_part(rec: Recorder, size: dict, device: str, what: str) -> None:
    """A fresh process with inductor's cache warm: seconds to import dynamo and inductor, of each of the
    first calls (compile and CUDA graph warm-up, recording, replay), and where torch says the compile
    time went (``compile_breakdown``)."""
    dev = torch.device(device)
    mode = "reduce-overhead" if dev.type == "cuda" else "default"

    def measure() -> dict:
        start = time.perf_counter()
        import importlib

        for module in ("torch._dynamo", "torch._inductor.compile_fx"):  # every compiled stage process imports them
            importlib.import_module(module)
        imports = time.perf_counter() - start
        if what == "train":
            t = Training(size, device)
            state, run = t.state(mode)
            call, path = (lambda: run(1)), lambda: state.path
        else:
            from ddpm.diffusion import Diffusion
            from ddpm.samplers import sample

            m = MODEL_CONFIGS[size["model"]]
            d = Diffusion.from_schedule("linear", 1000, device=dev)
            denoiser, _ = denoiser_for(m, dev, mode)
            shape = (size["sample_batch"], m.channels, m.image_size, m.image_size)
            call, path = (lambda: sample(denoiser, d, shape, sampler="ddim", steps=size["sample_steps"])), \
                lambda: denoiser.path
        calls = []
        for _ in range(size["warm_steps"]):
            sync(dev)
            start = time.perf_counter()
            call()
            sync(dev)
            calls.append(round(time.perf_counter() - start, 3))
        return {"import_dynamo_inductor_seconds": round(imports, 3), "calls_seconds": calls,
                "first_call_seconds": calls[0], "path": path(), "unit": "training step" if what == "train" else
                f"ddim-{size['sample_steps']} call at batch {size['sample_batch']}", **compile_breakdown()}

    rec.measure(f"warm.{what}", measure)


# --------------------------------------------------------------------------- peer
def peer_part(rec: Recorder, size: dict, device: str, which: str) -> None:
    """Ours and diffusers' UNet2DModel (``benchmarks.bench.build_peer``), bench's standard training step
    and sampling through ``make_denoiser``: eager training and sampling on CUDA graphs (``eager``), or
    both compiled with reduce-overhead (``compiled``)."""
    from benchmarks.bench import BenchConfig, build_peer, make_train_step
    from ddpm.acceleration import make_denoiser, prepare_model, to_memory_format
    from ddpm.diffusion import Diffusion
    from ddpm.samplers import sample

    m, dev = MODEL_CONFIGS[size["model"]], torch.device(device)
    d = Diffusion.from_schedule("linear", 1000, device=dev)
    memory_format = "channels_last" if dev.type == "cuda" else "contiguous"
    g = torch.Generator().manual_seed(0)
    shape = (size["batch_size"], m.channels, m.image_size, m.image_size)
    x0 = to_memory_format((torch.rand(shape, generator=g) * 2 - 1).to(dev), memory_format)
    noise = to_memory_format(torch.randn(shape, generator=g).to(dev), memory_format)
    t = torch.randint(0, 1000, (shape[0],), generator=g).to(dev)
    modes = {"eager": ("none", "cudagraphs"), "compiled": ("reduce-overhead", "reduce-overhead")}[which]
    precision = fast_precision(dev)

    def model(name: str):
        torch.manual_seed(0)
        ours = build_ours(m)
        return ours if name == "ours" else build_peer(m, ours)

    def train_one(name: str) -> dict:
        net = prepare_model(model(name), dev, precision=precision, memory_format=memory_format).train()
        cfg = BenchConfig(model=size["model"], device=str(dev), precision=precision, memory_format=memory_format,
                          compile=modes[0])
        step, _ = make_train_step(net, d, x0, t, noise, cfg)
        sync(dev)
        start = time.perf_counter()
        for _ in range(3):
            step()
        sync(dev)
        first = time.perf_counter() - start
        r = steady(lambda n: [step() for _ in range(n)], shape[0], size["seconds"], dev, first=size["timed_first"])
        return {"images_per_second": r["per_second"], "first_3_steps_seconds": first, "mode": modes[0],
                "path": f"{precision}, {memory_format}, compile {modes[0]}"}

    def sample_one(name: str) -> dict:
        denoiser = make_denoiser(model(name), dev, precision=precision, compile=modes[1])
        s = (size["sample_batch"], m.channels, m.image_size, m.image_size)
        run = lambda n: [sample(denoiser, d, s, sampler="ddim", steps=size["sample_steps"]) for _ in range(n)]  # noqa: E731
        sync(dev)
        start = time.perf_counter()
        run(1)
        sync(dev)
        first = time.perf_counter() - start
        r = steady(run, s[0] * size["sample_steps"], size["seconds"], dev, first=2)
        return {"image_steps_per_second": r["per_second"], "first_call_seconds": first, "path": denoiser.path,
                "mode": modes[1]}

    for name in ("ours", "peer"):
        rec.measure(f"peer.{which}.train.{name}", lambda name=name: train_one(name))
    for name in ("ours", "peer"):
        rec.measure(f"peer.{which}.sample.{name}", lambda name=name: sample_one(name))


def run_part(name: str, rec: Recorder, size: dict, device: str) -> None:
    """The part ``name`` (``benchmarks.gpu_check.PLAN``'s measuring parts)."""
    group, _, arg = name.partition(".")
    if group == "train":
        train_part(rec, size, device, arg)
    elif group == "profile":
        profile_part(rec, size, device, arg)
    elif group in ("sample", "likelihood"):
        sample_part(rec, size, device, arg, role=group)
    elif group == "warm":
        warm_part(rec, size, device, arg)
    elif group == "peer":
        peer_part(rec, size, device, arg)
    else:
        raise SystemExit(f"gpu_parts: unknown part {name!r}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_parts", description=__doc__.split("\n\n")[0])
    parser.add_argument("part", help="e.g. train.reduce-overhead, sample.cudagraphs, warm.train, peer.eager")
    parser.add_argument("--out", type=Path, required=True, help="the check's output folder")
    parser.add_argument("--size", choices=list(SIZES), default="gpu")
    parser.add_argument("--device", default="cuda")
    a = parser.parse_args(argv)
    torch.manual_seed(0)
    run_part(a.part, Recorder(a.out), SIZES[a.size], a.device)


if __name__ == "__main__":
    main()
