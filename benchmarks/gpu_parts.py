"""The measuring parts of ``gpu-check`` (``benchmarks.gpu_check``), each run as its own process:
``python3 -m benchmarks.gpu_parts PART --json OUT.json [--size gpu|ci] [--device cuda]``.

Each part writes what it measured to its JSON file as it goes (a part killed at its time limit
leaves what it had), and records an error per measurement that failed instead of stopping.
Needs only torch, numpy and annotated-types (and diffusers for ``peer``): no typer, pydantic,
DVC or MLflow, so it runs on a bare GPU machine with the system Python.

  train    ``ddpm.training.train`` on the default config (the U-Net of params.yaml, batch 128,
           the power EMA and two post-hoc profiles, clipping, warm-up), per compile mode (none,
           cudagraphs, reduce-overhead, step-graph, default): seconds
           of the first steps (compile, capture), steady img/s, peak memory, the path that ran;
           torch.profiler's host and GPU milliseconds and kernel launches per step (eager and the
           fastest mode), and the EMA update alone (3 × ``AveragedModel`` against ``Averages``)
  sample   ``ddpm.samplers.sample`` (ddim, 10 steps) at batch 1000 per inference path: autocast on
           float32 weights (the old path), bf16 weights cast once, + CUDA graphs, + compile
  warm     a fresh process with inductor's cache warm: what a stage process pays to compile
  peer     ours against diffusers' UNet2DModel of the same architecture, each eager and on its
           best path (bench's training step; sampling through ``make_denoiser``)
  proxies  the CPU proxies (``benchmarks.proxies``): ops per training / sampling step, casts
"""

import argparse
import json
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.bench import MODEL_CONFIGS, PEAK_FLOPS, build_ours, model_flops

# per size: the model config, batch sizes, timed seconds per measurement, the modes measured
SIZES = {
    "gpu": {"model": "fashion-mnist", "batch_size": 128, "sample_batch": 1000, "sample_steps": 10, "images": 8192,
            "seconds": 3.0, "train_modes": ["none", "cudagraphs", "reduce-overhead", "step-graph", "default"],
            "sample_modes": ["autocast", "none", "cudagraphs", "reduce-overhead"], "profile_steps": 10,
            "warmup_steps": 10, "timed_first": 20,
            "peer_modes": {"train": ["none", "reduce-overhead"], "sample": ["cudagraphs", "reduce-overhead"]}},
    "ci": {"model": "tiny", "batch_size": 4, "sample_batch": 4, "sample_steps": 2, "images": 64,
           "seconds": 0.2, "train_modes": ["none", "cudagraphs", "step-graph"], "sample_modes": ["autocast", "none", "cudagraphs"],
           "profile_steps": 2, "warmup_steps": 1, "timed_first": 2, "peer_modes": {"train": ["none"], "sample": ["none"]}},
}


class Recorder:
    """The part's results, rewritten to ``path`` after every measurement."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def measure(self, key: str, fn) -> None:
        """``put(key, fn())``, or the error that ``fn`` raised (one line and the traceback's tail)."""
        start = time.perf_counter()
        try:
            self.put(key, fn())
        except Exception as e:  # noqa: BLE001 — a failed measurement is a result, the next one runs
            self.put(key, {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}",
                           "traceback": traceback.format_exc()[-2000:], "seconds": round(time.perf_counter() - start, 1)})
        print(f"gpu-check: {key}: {json.dumps(self.data[key], default=str)[:300]}", flush=True)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((table["bf16"] for key, table in PEAK_FLOPS if key in name), None)


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


# --------------------------------------------------------------------------- train
def train_part(rec: Recorder, size: dict, device: str) -> None:
    from ddpm.diffusion import Diffusion
    from ddpm.training import TrainConfig, init_state, train

    m = MODEL_CONFIGS[size["model"]]
    dev = torch.device(device)
    d = Diffusion.from_schedule("linear", 1000, device=dev)
    images = torch.randint(0, 256, (size["images"], m.channels, m.image_size, m.image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(dev)
    flops = model_flops(build_ours(m).to(dev), m, dev)
    peak = peak_flops(dev)
    rec.put("model", {"config": size["model"], "train_flops_per_image": flops[1], "forward_flops_per_image": flops[0],
                      "batch_size": size["batch_size"], "peak_flops": peak})
    states = {}

    def one(mode: str) -> dict:
        torch.manual_seed(0)
        cfg = TrainConfig(steps=0, batch_size=size["batch_size"], compile=mode, precision="auto",
                          memory_format="auto")
        state = init_state(build_ours(m), cfg, 0, dev)
        reset_memory(dev)
        run = lambda n: train(state, d, images, replace(cfg, steps=state.step + n))  # noqa: E731
        sync(dev)
        start = time.perf_counter()
        run(3)
        sync(dev)
        first = time.perf_counter() - start
        run(size["warmup_steps"])  # CUDA graph trees record on the first calls after warm-up
        r = steady(run, size["batch_size"], size["seconds"], dev, first=size["timed_first"])
        states[mode] = (state, run)
        ips = r["per_second"]
        return {"images_per_second": ips, "steps_per_second": ips / size["batch_size"],
                "first_3_steps_seconds": first, "compile_seconds": max(0.0, first - 3 * r["seconds_per_call"]),
                "mfu": flops[1] * ips / peak if peak else None, "peak_memory_bytes": peak_memory(dev),
                "path": state.path, "steps_timed": r["calls"]}

    def profiled(mode: str) -> None:
        if mode in states:
            rec.measure(f"profile.{mode}", lambda: profile(*states[mode], size["profile_steps"], dev,
                                                           rec.path.with_suffix(f".profile-{mode}.txt")))

    # eager first, with its profile and the EMA's cost, so that a part cut short by a slow compile keeps them
    modes = size["train_modes"]
    rec.measure("train.none", lambda: one("none"))
    profiled("none")
    rec.measure("ema_update", lambda: ema_update_cost(m, dev))
    for mode in [m_ for m_ in modes if m_ != "none"]:
        rec.measure(f"train.{mode}", lambda mode=mode: one(mode))
        ok = {k.removeprefix("train."): v for k, v in rec.data.items()
              if k.startswith("train.") and isinstance(v, dict) and "images_per_second" in v}
        best = max(ok, key=lambda k: ok[k]["images_per_second"])
        rec.put("train.best", best)
        if best == mode:
            profiled(mode)


def profile(state, run, steps: int, device, table: Path) -> dict:
    """torch.profiler over ``steps`` training steps: host (self CPU) and GPU (self device) milliseconds
    and kernel launches (incl. CUDA graph launches) per step; the top of both tables to ``table``."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    sync(device)
    start = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        run(steps)
        sync(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    host = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    # device time of the device's own events only (kernels, copies): a CPU op's self device time repeats its kernels'
    from torch.autograd import DeviceType

    gpu = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e3 / steps
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                                                         "cuLaunchKernelEx", "cudaGraphLaunch")) / steps
    graphs = sum(e.count for e in events if e.key == "cudaGraphLaunch") / steps
    text = events.table(sort_by="self_cpu_time_total", row_limit=15)
    if gpu:
        try:
            text += "\n\n" + events.table(sort_by="self_device_time_total", row_limit=15)
        except (KeyError, AttributeError, ValueError):
            text += "\n\n" + events.table(sort_by="self_cuda_time_total", row_limit=15)
    table.write_text(text)
    return {"host_ms_per_step": host, "gpu_ms_per_step": gpu, "wall_ms_per_step_under_profiler": wall * 1e3 / steps,
            "launches_per_step": launches, "graph_launches_per_step": graphs, "steps": steps}


def ema_update_cost(m, device) -> dict:
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
        for _ in range(50):
            fn()
        sync(device)
        out[f"{name}_ms"] = (time.perf_counter() - start) / 50 * 1e3
    return out


# --------------------------------------------------------------------------- sample
def sample_part(rec: Recorder, size: dict, device: str) -> None:
    from ddpm.acceleration import make_denoiser, network, prepare_model, to_memory_format
    from ddpm.diffusion import Diffusion
    from ddpm.samplers import sample

    m = MODEL_CONFIGS[size["model"]]
    dev = torch.device(device)
    d = Diffusion.from_schedule("linear", 1000, device=dev)
    shape = (size["sample_batch"], m.channels, m.image_size, m.image_size)
    forward_flops = model_flops(build_ours(m).to(dev), m, dev)[0]
    peak = peak_flops(dev)
    steps = size["sample_steps"]

    def one(mode: str) -> dict:
        torch.manual_seed(0)
        net = build_ours(m)
        if mode == "autocast":  # float32 weights under bf16 autocast: what sampling did before
            net = prepare_model(net, dev, precision="bf16", memory_format="channels_last").eval()
            fwd = network(net, "bf16", dev)
            memory_format = "channels_last" if dev.type == "cuda" else "contiguous"
            denoiser = lambda x, t: fwd(to_memory_format(x, memory_format), t)  # noqa: E731
            path = "bf16 autocast on float32 weights, eager"
        else:
            denoiser = make_denoiser(net, dev, precision="bf16", compile=mode)
            path = None
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
                "path": path or denoiser.path, "calls_timed": r["calls"]}

    rec.put("model", {"config": size["model"], "forward_flops_per_image": forward_flops, "batch_size": shape[0],
                      "sampler": "ddim", "steps": steps, "peak_flops": peak})
    for mode in size["sample_modes"]:
        rec.measure(f"sample.{mode}", lambda mode=mode: one(mode))


# --------------------------------------------------------------------------- warm compile
def warm_part(rec: Recorder, size: dict, device: str) -> None:
    """In a fresh process after the parts above (inductor's cache warm): seconds to the first result of
    a compiled training step and sampling call, as a stage process pays them."""
    from ddpm.acceleration import make_denoiser
    from ddpm.diffusion import Diffusion
    from ddpm.samplers import sample
    from ddpm.training import TrainConfig, init_state, train

    m = MODEL_CONFIGS[size["model"]]
    dev = torch.device(device)
    d = Diffusion.from_schedule("linear", 1000, device=dev)
    mode = "reduce-overhead" if dev.type == "cuda" else "none"

    def train_first() -> dict:
        torch.manual_seed(0)
        cfg = TrainConfig(steps=3, batch_size=size["batch_size"], compile=mode)
        state = init_state(build_ours(m), cfg, 0, dev)
        images = torch.randint(0, 256, (size["images"], m.channels, m.image_size, m.image_size),
                               dtype=torch.uint8).to(dev)
        start = time.perf_counter()
        train(state, d, images, cfg)
        sync(dev)
        return {"first_3_steps_seconds": time.perf_counter() - start, "path": state.path}

    def sample_first() -> dict:
        denoiser = make_denoiser(build_ours(m), dev, precision="bf16", compile=mode)
        shape = (size["sample_batch"], m.channels, m.image_size, m.image_size)
        start = time.perf_counter()
        sample(denoiser, d, shape, sampler="ddim", steps=size["sample_steps"])
        sync(dev)
        return {"first_call_seconds": time.perf_counter() - start, "path": denoiser.path}

    rec.measure("warm.train", train_first)
    rec.measure("warm.sample", sample_first)


# --------------------------------------------------------------------------- peer
def peer_part(rec: Recorder, size: dict, device: str) -> None:
    """Ours and diffusers' UNet2DModel (``benchmarks.bench.build_peer``), bench's standard training step
    and sampling through ``make_denoiser``, each mode in ``size["peer_modes"]``."""
    from benchmarks.bench import BenchConfig, build_peer, make_train_step
    from ddpm.acceleration import make_denoiser, prepare_model, to_memory_format
    from ddpm.diffusion import Diffusion
    from ddpm.samplers import sample

    m = MODEL_CONFIGS[size["model"]]
    dev = torch.device(device)
    d = Diffusion.from_schedule("linear", 1000, device=dev)
    memory_format = "channels_last" if dev.type == "cuda" else "contiguous"
    g = torch.Generator().manual_seed(0)
    shape = (size["batch_size"], m.channels, m.image_size, m.image_size)
    x0 = to_memory_format((torch.rand(shape, generator=g) * 2 - 1).to(dev), memory_format)
    noise = to_memory_format(torch.randn(shape, generator=g).to(dev), memory_format)
    t = torch.randint(0, 1000, (shape[0],), generator=g).to(dev)

    def model(name: str):
        torch.manual_seed(0)
        ours = build_ours(m)
        return ours if name == "ours" else build_peer(m, ours)

    def train_one(name: str, mode: str) -> dict:
        net = prepare_model(model(name), dev, precision="bf16", memory_format=memory_format).train()
        cfg = BenchConfig(model=size["model"], device=str(dev), precision="bf16", memory_format=memory_format,
                          compile=mode)
        step, _ = make_train_step(net, d, x0, t, noise, cfg)
        sync(dev)
        start = time.perf_counter()
        for _ in range(3):
            step()
        sync(dev)
        first = time.perf_counter() - start
        r = steady(lambda n: [step() for _ in range(n)], shape[0], size["seconds"], dev, first=size["timed_first"])
        return {"images_per_second": r["per_second"], "first_3_steps_seconds": first}

    def sample_one(name: str, mode: str) -> dict:
        denoiser = make_denoiser(model(name), dev, precision="bf16", compile=mode)
        s = (size["sample_batch"], m.channels, m.image_size, m.image_size)
        run = lambda n: [sample(denoiser, d, s, sampler="ddim", steps=size["sample_steps"]) for _ in range(n)]  # noqa: E731
        sync(dev)
        start = time.perf_counter()
        run(1)
        sync(dev)
        first = time.perf_counter() - start
        r = steady(run, s[0] * size["sample_steps"], size["seconds"], dev, first=2)
        return {"image_steps_per_second": r["per_second"], "first_call_seconds": first, "path": denoiser.path}

    for mode in size["peer_modes"]["train"]:
        for name in ("ours", "peer"):
            rec.measure(f"peer.train.{name}.{mode}", lambda name=name, mode=mode: train_one(name, mode))
    for mode in size["peer_modes"]["sample"]:
        for name in ("ours", "peer"):
            rec.measure(f"peer.sample.{name}.{mode}", lambda name=name, mode=mode: sample_one(name, mode))


# --------------------------------------------------------------------------- proxies
def proxies_part(rec: Recorder, size: dict, device: str) -> None:
    from benchmarks.proxies import count_sample, count_train

    m = MODEL_CONFIGS["fashion-mnist"]  # counts do not depend on the device: the default config always
    for precision in ("fp32", "bf16"):
        rec.measure(f"proxies.{precision}.train", lambda p=precision: {
            k: v for k, v in count_train(m.unet, m.image_size, m.channels, precision=p).items() if k != "by_op"})
        rec.measure(f"proxies.{precision}.sample", lambda p=precision: {
            k: v for k, v in count_sample(m.unet, m.image_size, m.channels, precision=p).items() if k != "by_op"})


PARTS = {"train": train_part, "sample": sample_part, "warm": warm_part, "peer": peer_part, "proxies": proxies_part}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_parts", description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=list(PARTS))
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--size", choices=list(SIZES), default="gpu")
    parser.add_argument("--device", default="cuda")
    a = parser.parse_args(argv)
    rec = Recorder(a.json)
    torch.manual_seed(0)
    if a.part != "proxies":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    PARTS[a.part](rec, SIZES[a.size], a.device)


if __name__ == "__main__":
    main()
