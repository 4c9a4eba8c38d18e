"""Side-by-side throughput benchmark: our U-Net against diffusers' ``UNet2DModel`` built
with the identical architecture, measured in the same process on the same inputs, so
that the result is a ratio rather than an absolute time.

For a named model config (``MODEL_CONFIGS``) it measures, for each model:

  train   one standard training step on a fixed batch: x_t = q_sample(x_0, t, ε),
          MSE between the network output and ε, backward, AdamW step (identical code
          for both models; no clipping, no EMA) → images/s
  loop    ours only: ``ddpm.training.train`` itself (sampling of batches, clipping, EMA)
  sample  ``ddpm.samplers.sample`` with each sampler for ``sample_steps`` steps →
          images/s and model evaluations/s (images × steps / s)

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one forward and
one forward + backward of the eager model (matmuls, convolutions and attention; norms
and elementwise ops are not counted, the usual MFU convention). MFU = counted FLOPs ×
throughput / peak FLOP/s, where the peak is the user's figure, else a datasheet figure
for a known GPU (dense, ``PEAK_FLOPS``), else on CPU the measured matmul rate of the run's
precision (float32, or bfloat16 for bf16; both rates are reported), so CPU MFU is relative
to what this machine's matmul achieves at that moment. On a CPU whose cores other processes
share, wall time measures the load as much as the code: there MFU is also given per process
CPU time (``mfu_by_process_cpu_time``, against the matmul rate per process CPU time), which
with one thread is what the code achieves while it runs.

Timing: warm-up iterations first (not timed; they include torch.compile), then
``repeats`` rounds that time ``iters`` iterations of each model in turn (the order
alternates between rounds so a drifting machine load hits both alike), with CUDA
synchronised around every timed region; figures are medians over rounds. The ratio
ours/peer (> 1: ours faster) is given from the median wall time and, for shared machines
where other processes' load makes wall time noisy, also from the best round and from
process CPU time. Peak memory
on CUDA is, per model, its weights (+ AdamW state when training) plus the peak
transient allocation of one step; on CPU only the process-wide high-water mark
(ru_maxrss) exists, reported once for the whole run.
"""

import resource
from collections.abc import Callable
import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
import torch.utils.flop_counter as flop_counter

from ddpm.acceleration import compile_model, make_adamw, make_denoiser, network, prepare_model, resolve, to_memory_format
from ddpm.diffusion import Diffusion, q_sample
from ddpm.errors import InputError
from ddpm.samplers import SAMPLERS, sample
from ddpm.training import TrainConfig, init_state, train
from ddpm.unet import UNet, UNetConfig


@dataclass(frozen=True)
class BenchModel:
    unet: UNetConfig
    image_size: int
    channels: int


MODEL_CONFIGS: dict[str, BenchModel] = {
    # Ho et al. 2020's CIFAR-10 model: 35.7M parameters
    "ddpm-cifar10": BenchModel(UNetConfig(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                                          dropout=0.1), 32, 3),
    # the default model of params.yaml, at Fashion-MNIST's 28×28×1
    "fashion-mnist": BenchModel(UNetConfig(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(14,),
                                           dropout=0.1), 28, 1),
    # CI-sized; ch=64: narrower levels get fewer GroupNorm groups (ddpm.unet.norm), which UNet2DModel cannot match
    "tiny": BenchModel(UNetConfig(ch=64, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1), 16, 3),
}

# Dense peak FLOP/s per GPU from the vendors' datasheets (no sparsity), by precision.
# Matched against torch.cuda.get_device_name in this order (first substring wins).
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    ("H100", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),  # SXM
    ("H200", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
]

PEERS = ("diffusers", "none")


@dataclass
class BenchConfig:
    model: str = "tiny"
    device: str = "cpu"
    batch_size: int = 8             # training batch
    sample_batch_size: int = 8
    sample_steps: int = 10
    samplers: tuple[str, ...] = ("ddpm", "ddim")
    warmup: int = 1                 # untimed iterations per model and measurement
    repeats: int = 3                # timed rounds; the median is reported
    iters: int = 1                  # iterations per timed round
    precision: str = "fp32"         # auto | fp32 | tf32 | bf16, see ddpm.acceleration
    memory_format: str = "contiguous"  # auto | contiguous | channels_last
    compile: str = "none"           # auto | none | default | max-autotune
    peak_flops: float | None = None  # FLOP/s; None: datasheet (known GPU) or measured (CPU)
    peer: str = "diffusers"         # diffusers | none
    threads: int | None = None      # CPU threads of PyTorch during the run; None: as set
    seed: int = 0

    def validate(self) -> "BenchConfig":
        """This config with ``auto`` choices made concrete for its device; ValueError when a choice is bad."""
        if self.model not in MODEL_CONFIGS:
            raise InputError(f"unknown model config {self.model!r}; choose one of {', '.join(MODEL_CONFIGS)}")
        if self.peer not in PEERS:
            raise InputError(f"unknown peer {self.peer!r}; choose one of {', '.join(PEERS)}")
        unknown = [s for s in self.samplers if s not in SAMPLERS]
        if unknown:
            raise InputError(f"unknown samplers {unknown}; choose from {', '.join(SAMPLERS)}")
        for name in ("batch_size", "sample_batch_size", "sample_steps", "repeats", "iters", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise InputError(f"warmup must be >= 0, got {self.warmup}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise InputError(f"peak FLOP/s must be > 0, got {self.peak_flops}")
        path = resolve(self.device, self.precision, self.memory_format, self.compile)
        return replace(self, precision=path.precision, memory_format=path.memory_format, compile=path.compile)


class PeerUnavailable(Exception):
    pass


# --------------------------------------------------------------------------- models
def build_ours(m: BenchModel) -> UNet:
    return UNet(m.unet, image_size=m.image_size, in_channels=m.channels, out_channels=m.channels)


class DiffusersUNet(torch.nn.Module):
    """diffusers' UNet2DModel behind our ``model(x, t) -> tensor`` interface."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x, t, return_dict=False)[0]


def build_peer(m: BenchModel, ours: UNet) -> DiffusersUNet:
    """diffusers' UNet2DModel with our architecture: same widths per level, residual blocks
    per level (+1 in the decoder), single-head attention at the same resolutions and in the
    middle, GroupNorm groups, dropout, sinusoidal embedding (cos first, no frequency shift)
    and 4·ch embedding MLP. Raises PeerUnavailable when diffusers is not installed."""
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise PeerUnavailable(f"diffusers is not importable ({e}); install the extra: pip install '.[bench]'") from None
    groups = {mod.num_groups for mod in ours.modules() if isinstance(mod, torch.nn.GroupNorm)}
    if len(groups) != 1:
        raise InputError(f"this config uses GroupNorm group counts {sorted(groups)}; UNet2DModel has a single "
                         f"one, so it cannot be matched (make every width a multiple of 32 and at least 64)")
    c = m.unet
    res = [m.image_size // 2**i for i in range(len(c.ch_mult))]
    net = UNet2DModel(
        sample_size=m.image_size, in_channels=m.channels, out_channels=m.channels,
        block_out_channels=tuple(c.ch * k for k in c.ch_mult), layers_per_block=c.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if r in c.attn_resolutions else "DownBlock2D" for r in res),
        up_block_types=tuple("AttnUpBlock2D" if r in c.attn_resolutions else "UpBlock2D" for r in reversed(res)),
        attention_head_dim=None, norm_num_groups=groups.pop(), dropout=c.dropout,
        flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, act_fn="silu",
    )
    return DiffusersUNet(net)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- FLOPs
def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the CUDA attention kernels but not the fused CPU one.
_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


def count_flops(fn) -> int:
    """FLOPs of running ``fn()`` (forward, and backward when ``fn`` calls it)."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        fn()
    return counter.get_total_flops()


def model_flops(model: torch.nn.Module, m: BenchModel, device) -> tuple[int, int]:
    """(forward FLOPs, forward + backward FLOPs) per image, counted on a batch of one."""
    x = torch.randn(1, m.channels, m.image_size, m.image_size, device=device)
    t = torch.tensor([500], device=device)
    with torch.no_grad():
        forward = count_flops(lambda: model(x, t))
    step = count_flops(lambda: model(x, t).float().pow(2).mean().backward())
    model.zero_grad(set_to_none=True)
    return forward, step


MATMUL_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}


def peak_flops(device, precision: str, given: float | None, measured: dict | None = None) -> tuple[float, str]:
    """Peak FLOP/s for MFU and where it came from; on CPU the ``measured`` matmul rate of the
    precision (``measure_cpu_matmul``), measured here when not given."""
    if given is not None:
        return given, "given by the user"
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, table in PEAK_FLOPS:
            if key in name:
                return table[precision], f"datasheet, dense {precision}, {key}"
        raise InputError(f"no datasheet peak FLOP/s for {name!r}; give one (--peak-tflops)")
    measured = measured or measure_cpu_matmul(device, (precision,))
    dtype = str(MATMUL_DTYPES[precision]).removeprefix("torch.")
    n = measured["size"][precision]
    return measured["wall"][precision], f"measured: best of {MATMUL_REPEATS} {dtype} {n}×{n} matmuls on this machine"


MATMUL_SIZES = (256, 512, 1024, 2048)  # tried in turn until one matmul takes MATMUL_LONG seconds
MATMUL_LONG = 0.05
MATMUL_REPEATS = 3


def measure_cpu_matmul(device, precisions=("fp32", "bf16")) -> dict[str, dict]:
    """The matmul rates (FLOP/s) of this CPU for each precision with the current thread count, per wall
    time and per process CPU time (``process_cpu``: what a thread achieves while it runs, the figure
    that a shared, loaded machine disturbs least), and the matrix size each was measured at (``size``).

    Each takes well under a second: the size grows from 256 until one product takes ``MATMUL_LONG``
    seconds (at most 2048), then the best of ``MATMUL_REPEATS`` counts. So a CPU without native
    bfloat16, where one 2048² bf16 product takes 15–30 s, measures at 256 or 512 instead."""
    out = {"wall": {}, "process_cpu": {}, "size": {}}
    for name in precisions:
        n, (wall, cpu) = matmul_rates(device, MATMUL_DTYPES[name])
        out["wall"][name], out["process_cpu"][name], out["size"][name] = wall, cpu, n
    return out


def matmul_rates(device, dtype: torch.dtype = torch.float32) -> tuple[int, tuple[float, float]]:
    """(n, (FLOP/s per wall second, per process CPU second)) of n×n products in ``dtype``, n the first of
    ``MATMUL_SIZES`` whose product takes ``MATMUL_LONG`` seconds (or the last)."""
    for n in MATMUL_SIZES:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # first call: allocation, kernel selection
        walls, cpus = [], []
        for _ in range(MATMUL_REPEATS):
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            a @ b
            _sync(device)
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu_start)
            if walls[0] < MATMUL_LONG and n != MATMUL_SIZES[-1]:
                break  # too short to time well: the next size
        else:
            flops = 2 * n**3
            return n, (flops / min(walls), flops / max(min(cpus), 1e-9))
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- timing
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, iters: int, device) -> tuple[float, float]:
    """(wall, process CPU) seconds per iteration of ``fn``, CUDA synchronised before and after."""
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters, (time.process_time() - cpu_start) / iters


def time_interleaved(fns: dict[str, Callable], cfg: BenchConfig) -> dict[str, dict[str, list[float]]]:
    """Warm up each function, then ``repeats`` rounds timing each in turn (order alternating).
    Returns per name the wall and process-CPU seconds per iteration of every round."""
    for fn in fns.values():
        for _ in range(cfg.warmup):
            fn()
    _sync(cfg.device)
    times = {name: {"wall": [], "cpu": []} for name in fns}
    names = list(fns)
    for r in range(cfg.repeats):
        for name in names if r % 2 == 0 else reversed(names):
            wall, cpu = _timed(fns[name], cfg.iters, cfg.device)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    return times


def _figures(times: dict[str, list[float]], images: int) -> dict:
    """images/s from the median and from the best (shortest) round, the raw rounds, and the
    median process CPU time; on a shared machine the best round is the one least disturbed."""
    return {"images_per_second": images / statistics.median(times["wall"]),
            "best_images_per_second": images / min(times["wall"]), "seconds": times["wall"],
            "process_cpu_seconds": statistics.median(times["cpu"])}


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def step_peak_bytes(fn, resident_bytes: int, device) -> int | None:
    """CUDA: ``resident_bytes`` plus the peak transient allocation of one ``fn()``; None on CPU."""
    if torch.device(device).type != "cuda":
        return None
    _sync(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - start + resident_bytes


# --------------------------------------------------------------------------- measurements
def make_train_step(model, diffusion: Diffusion, x0, t, noise, cfg: BenchConfig):
    """The standard step, same for every model: MSE on ε, backward, AdamW."""
    forward = network(compile_model(model, cfg.compile), cfg.precision, cfg.device)
    optimizer = make_adamw(model.parameters(), cfg.device, lr=1e-4)

    def step():
        xt = q_sample(diffusion, x0, t, noise)
        F.mse_loss(forward(xt, t), noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def make_sampler_run(model, diffusion: Diffusion, m: BenchModel, sampler: str, cfg: BenchConfig):
    denoiser = make_denoiser(model, cfg.device, precision=cfg.precision, memory_format=cfg.memory_format,
                             compile=cfg.compile)
    shape = (cfg.sample_batch_size, m.channels, m.image_size, m.image_size)
    g = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    return lambda: sample(denoiser, diffusion, shape, sampler=sampler, steps=cfg.sample_steps, generator=g)


def measure_loop(model_config: BenchModel, diffusion: Diffusion, cfg: BenchConfig) -> dict:
    """Ours only: ``ddpm.training.train`` (batch sampling, clipping, EMA) on a synthetic uint8 set."""
    torch.manual_seed(cfg.seed)
    net = build_ours(model_config)
    tc = TrainConfig(steps=0, batch_size=cfg.batch_size, warmup_steps=1, log_every=10**9,
                     precision=cfg.precision, memory_format=cfg.memory_format, compile=cfg.compile)
    state = init_state(net, tc, cfg.seed, cfg.device)
    g = torch.Generator().manual_seed(cfg.seed)
    images = torch.randint(0, 256, (4 * cfg.batch_size, model_config.channels, model_config.image_size,
                                    model_config.image_size), generator=g, dtype=torch.uint8).to(cfg.device)

    def run(n):
        train(state, diffusion, images, replace(tc, steps=state.step + n))

    times = time_interleaved({"loop": lambda: run(cfg.iters)}, replace(cfg, iters=1))["loop"]
    return _figures({k: [s / cfg.iters for s in v] for k, v in times.items()}, cfg.batch_size)


def run_benchmark(cfg: BenchConfig) -> dict:
    cfg = cfg.validate()
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: BenchConfig) -> dict:
    device = torch.device(cfg.device)
    m = MODEL_CONFIGS[cfg.model]
    diffusion = Diffusion.from_schedule("linear", 1000, device=device)
    matmul = measure_cpu_matmul(device) if device.type != "cuda" and cfg.peak_flops is None else None
    peak, peak_source = peak_flops(device, cfg.precision, cfg.peak_flops, matmul)

    torch.manual_seed(cfg.seed)
    models: dict[str, torch.nn.Module] = {"ours": build_ours(m)}
    result_models: dict[str, dict] = {}
    if cfg.peer == "diffusers":
        try:
            models["peer"] = build_peer(m, models["ours"])
        except PeerUnavailable as e:
            result_models["peer"] = {"available": False, "name": "diffusers.UNet2DModel", "reason": str(e)}
    else:
        result_models["peer"] = {"available": False, "name": None, "reason": "not asked for (--peer none)"}

    for name, model in models.items():
        prepare_model(model, device, precision=cfg.precision, memory_format=cfg.memory_format, compile=cfg.compile)
        fwd, step = model_flops(model, m, device)
        result_models[name] = {"available": True, "parameters": parameter_count(model),
                               "forward_flops_per_image": fwd, "train_flops_per_image": step}
    result_models["ours"]["name"] = "ddpm.unet.UNet"
    if "peer" in models:
        import diffusers

        result_models["peer"].update(name="diffusers.UNet2DModel", version=diffusers.__version__)

    # (1) training step, same batch for every model
    g = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch_size, m.channels, m.image_size, m.image_size)
    x0 = to_memory_format((torch.rand(shape, generator=g) * 2 - 1).to(device), cfg.memory_format)
    noise = to_memory_format(torch.randn(shape, generator=g).to(device), cfg.memory_format)
    t = torch.randint(0, diffusion.num_timesteps, (cfg.batch_size,), generator=g).to(device)
    steps, optimizers = {}, {}
    for name, model in models.items():
        model.train()
        steps[name], optimizers[name] = make_train_step(model, diffusion, x0, t, noise, cfg)
    times = time_interleaved(steps, cfg)
    for name, model in models.items():
        r = result_models[name]
        resident = _tensor_bytes(model.parameters()) + _tensor_bytes(
            v for s in optimizers[name].state.values() for v in s.values() if torch.is_tensor(v))
        r["train"] = _figures(times[name], cfg.batch_size)
        r["train"].update(mfu=r["train_flops_per_image"] * r["train"]["images_per_second"] / peak,
                          peak_memory_bytes=step_peak_bytes(steps[name], resident, device))
        if matmul:
            r["train"]["mfu_by_process_cpu_time"] = (r["train_flops_per_image"] * cfg.batch_size / r["train"]["process_cpu_seconds"]
                                                     / matmul["process_cpu"][cfg.precision])
    del steps, optimizers

    # (2) the full training loop, ours only
    result_models["ours"]["loop"] = measure_loop(m, diffusion, cfg)

    # (3) sampling, per sampler
    for model in models.values():
        model.eval()
    for sampler in cfg.samplers:
        runs = {name: make_sampler_run(model, diffusion, m, sampler, cfg) for name, model in models.items()}
        times = time_interleaved(runs, cfg)
        for name, model in models.items():
            r = result_models[name]
            f = r.setdefault("sample", {})[sampler] = _figures(times[name], cfg.sample_batch_size)
            evals = f["images_per_second"] * cfg.sample_steps
            f.update(model_evaluations_per_second=evals, mfu=r["forward_flops_per_image"] * evals / peak,
                     peak_memory_bytes=step_peak_bytes(runs[name], _tensor_bytes(model.parameters()), device))
            if matmul:
                f["mfu_by_process_cpu_time"] = (r["forward_flops_per_image"] * cfg.sample_batch_size * cfg.sample_steps
                                                / f["process_cpu_seconds"] / matmul["process_cpu"][cfg.precision])

    ratio, best_ratio, cpu_ratio = {}, {}, {}
    if "peer" in models:
        ours, peer = result_models["ours"], result_models["peer"]
        for key, a, b in [("train", ours["train"], peer["train"])] + [
                (f"sample.{s}", ours["sample"][s], peer["sample"][s]) for s in cfg.samplers]:
            ratio[key] = a["images_per_second"] / b["images_per_second"]
            best_ratio[key] = a["best_images_per_second"] / b["best_images_per_second"]
            cpu_ratio[key] = b["process_cpu_seconds"] / a["process_cpu_seconds"]
    return {
        "config": cfg.model, "model": {**m.unet.to_dict(), "image_size": m.image_size, "channels": m.channels},
        "device": str(device), "device_name": _device_name(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "settings": asdict(cfg),
        "peak_flops": {"value": peak, "source": peak_source}, "measured_matmul_flops": matmul,
        "models": result_models, "ratio_ours_over_peer": ratio,
        "ratio_ours_over_peer_best": best_ratio, "ratio_ours_over_peer_by_process_cpu_time": cpu_ratio,
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    import platform

    return names[0] if names else platform.machine()
