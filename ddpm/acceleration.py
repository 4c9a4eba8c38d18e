"""The fast path, as named choices: numeric precision, memory format, compilation and CUDA graphs.

    precision      auto  the device's fast path: bf16 on CUDA, fp32 on CPU (the default)
                   fp32  plain float32 everywhere (bit-identical on CPU)
                   tf32  float32 storage, TF32 tensor-core matmuls and convolutions (CUDA only)
                   bf16  training: bfloat16 autocast of the network's forward pass; weights,
                         gradients, optimizer state, the loss, the sampler's state and the
                         diffusion tables stay float32 (or float64). Inference (sampling, the
                         bound, denoising): the network's weights cast to bfloat16 once, no
                         autocast. On CUDA, TF32 for what stays in float32
    memory_format  auto (channels_last on CUDA, contiguous on CPU) | contiguous |
                   channels_last (NHWC, what tensor-core convolutions want)
    compile        none            eager PyTorch: one Python-issued launch per kernel
                   default         ``torch.compile``: inductor fuses GroupNorm, SiLU, the casts and
                                   the elementwise tails, but still launches each kernel from Python
                   reduce-overhead ``torch.compile`` with CUDA graphs: fused kernels, replayed as one
                                   graph per call (forward, and backward when training)
                   max-autotune    as reduce-overhead, and inductor autotunes its kernels (slow to
                                   compile)
                   cudagraphs      no compiler: the eager kernels replayed from CUDA graphs. For
                                   inference the network's call is captured once per input shape
                                   (``torch.cuda.CUDAGraph``), for training through
                                   ``torch.compile(backend="cudagraphs")`` (forward and backward)
                   step-graph      training: the forward compiled (``default``) and the whole step
                                   (forward, backward, clipping, AdamW with a tensor learning rate,
                                   every average of the weights) captured as one CUDA graph
                                   (``CapturedStep``), one launch per step; not yet measured on a GPU,
                                   so ``auto`` never picks it. Inference: as reduce-overhead
                   auto            see ``AUTO``

CUDA graphs need a CUDA device and one process: on a CPU the graph modes run without graphs
(reduce-overhead and max-autotune compile, cudagraphs is eager), and under DDP training they run
as ``default``; ``resolve`` says so in the ``FastPath``'s ``note``.

A fast path never stops a run (``Fallback``): if a compiled or graphed call fails where the plain
(eager) call of the same inputs succeeds, the run continues on the plain path for good, after one
warning line saying why; ``path`` records what ran. An error of the plain call too is a real one
and is raised.

``resolve`` turns the choices into concrete ones for a device and checks them before any work
(tf32 on a CPU is an error, not a silent fall-back); ``prepare_model`` moves a model to its device
in its memory format; ``compile_model`` wraps a training forward; ``network`` is the one place
where a training forward runs under bf16 autocast, its output cast back; ``inference_network``
is the one place where a network runs for inference (the weights cast once); ``make_adamw``
builds AdamW, fused into one kernel; ``make_denoiser`` gives the ``model(x, t)`` callable a sampler
calls, with all of it applied. With fp32, contiguous, none (``auto`` on a CPU) every one of them
is a no-op.
"""

import contextlib
import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ddpm.config.fast_path import COMPILE_MODES, MEMORY_FORMATS, PRECISIONS
from ddpm.errors import FastPathWarning, InputError

GRAPH_MODES = ("reduce-overhead", "max-autotune", "cudagraphs", "step-graph")  # the modes that replay CUDA graphs
COMPILER_MODES = ("default", "reduce-overhead", "max-autotune")  # the modes that run inductor
ROLES = ("train", "inference", "likelihood")  # likelihood: the variational bound (nll), kept in float32


@dataclass(frozen=True)
class FastPath:
    """Concrete choices (no ``auto``) for one device, and a note when a choice could not apply there."""

    precision: str = "fp32"
    memory_format: str = "contiguous"
    compile: str = "none"
    note: str = ""

    def describe(self) -> str:
        return f"{self.precision}, {self.memory_format}, compile {self.compile}" + (f" ({self.note})" if self.note else "")


# What ``auto`` means, per device type and role. On CUDA both roles replay CUDA graphs, and
# compile as well (reduce-overhead) where ``compile_pays``: measured on an H200, compiling fuses
# GroupNorm, SiLU and the casts (training 1.3×, sampling 2.8× the graphed eager kernels) but costs
# a minute or so once per process and configuration (README, Performance).
# The bound in bits/dim keeps float32 on CUDA too: on the CPU preset's U-Net (600 steps, 16 test
# images, the same noise) bf16 weights moved it by +0.005 bits/dim (3.6805 → 3.6859), about the
# spread of the baseline over seeds; sampling is not that sensitive.
AUTO = {"cuda": {"train": FastPath("bf16", "channels_last", "cudagraphs"),
                 "inference": FastPath("bf16", "channels_last", "cudagraphs"),
                 "likelihood": FastPath("fp32", "channels_last", "cudagraphs")},
        "cpu": {role: FastPath("fp32", "contiguous", "none") for role in ROLES}}

# Measured on an H200 (torch 2.11, CUDA 13, 2026-12-04; benchmarks/results/h200-2026-12-04): per role,
# (rate, seconds to the first result in a fresh process with inductor's cache cold) of the default
# config: training img/s at batch 128, sampling image-evaluations/s at batch 1000.
MEASURED = {"train": {"cudagraphs": (5202.0, 12.5), "reduce-overhead": (6894.0, 84.1)},
            "inference": {"cudagraphs": (26029.0, 0.5), "reduce-overhead": (72210.0, 24.6)}}


def compile_pays(work: float | None, device, role: str = "inference") -> bool:
    """Whether compiling (reduce-overhead) beats the graphed eager kernels (cudagraphs) over ``work``
    images (training) or image-evaluations (inference), compile time included (``MEASURED``)."""
    if work is None or torch.device(device).type != "cuda":
        return False
    (eager, eager_start), (compiled, compile_start) = (MEASURED[role][m] for m in ("cudagraphs", "reduce-overhead"))
    return work * (1 / eager - 1 / compiled) > compile_start - eager_start


def resolve(device, precision: str = "auto", memory_format: str = "auto", compile: str = "auto", *,
            role: str = "train", work: float | None = None, distributed: bool = False) -> FastPath:
    """The concrete choices for ``device`` and ``role`` (train | inference); an ``InputError`` naming the
    option when one is unknown or needs CUDA. ``work``: the images a training run will train on, or the
    image-evaluations an inference run will make, for ``auto``'s choice whether to compile
    (``compile_pays``). Graph modes without CUDA, or in DDP training (``distributed``), become their
    graph-less equivalent with a ``note`` saying so."""
    for name, value, allowed in (("precision", precision, PRECISIONS), ("memory_format", memory_format, MEMORY_FORMATS),
                                 ("compile", compile, COMPILE_MODES), ("role", role, ROLES)):
        if value not in allowed:
            raise InputError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
    kind = torch.device(device).type
    auto = AUTO.get(kind, AUTO["cpu"])[role]
    if compile == "auto" and auto.compile == "cudagraphs" and role in MEASURED and compile_pays(work, device, role):
        auto = replace(auto, compile="reduce-overhead")
    path = FastPath(auto.precision if precision == "auto" else precision,
                    auto.memory_format if memory_format == "auto" else memory_format,
                    auto.compile if compile == "auto" else compile)
    if path.precision == "tf32" and kind != "cuda":
        raise InputError(f"precision 'tf32' needs a CUDA device (got {device}); use fp32 or bf16 on CPU")
    if path.compile == "step-graph" and role != "train":
        path = replace(path, compile="reduce-overhead", note="step-graph captures training steps; inference runs "
                                                             "as reduce-overhead")
    if path.compile == "step-graph" and kind != "cuda":
        path = replace(path, note=f"CUDA graphs need a CUDA device, so on {kind} the step runs uncaptured and eager")
    elif path.compile in GRAPH_MODES and kind != "cuda":
        instead = {"reduce-overhead": "default", "max-autotune": "default", "cudagraphs": "none"}[path.compile]
        path = replace(path, compile=instead, note=f"CUDA graphs need a CUDA device, so {path.compile} runs as "
                                                   f"{instead} on {kind}")
    elif path.compile in GRAPH_MODES and distributed and role == "train":
        path = replace(path, compile="default", note=f"{path.compile} runs as default under DDP (its gradient "
                                                      f"all-reduce is not captured in CUDA graphs)")
    return path


def set_matmul_precision(precision: str, device) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on CUDA when precision is tf32 or bf16, and
    cuDNN's autotuner on (the shapes of a run are fixed: it picks each convolution's fastest kernel
    once, as EDM2's training loop does).

    This is process-wide state (PyTorch has no per-model switch); fp32 sets it back to IEEE."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    mode = "ieee" if precision == "fp32" else "tf32"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


def prepare_model(model: torch.nn.Module, device, *, precision: str = "auto", memory_format: str = "auto",
                  compile: str = "auto") -> torch.nn.Module:
    """Check the choices, then move ``model`` (in place) to ``device`` in its memory format."""
    path = resolve(device, precision, memory_format, compile)
    set_matmul_precision(path.precision, device)
    model = model.to(device)
    if path.memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return model


def _mark_step(fn):
    """``fn`` preceded by ``cudagraph_mark_step_begin``: each call starts a new iteration for
    inductor's CUDA graph trees, so the previous call's outputs (copied by then) may be overwritten."""

    def call(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return fn(*args, **kwargs)

    return call


def compile_model(model: torch.nn.Module, compile: str = "none"):
    """``model`` itself for ``none``; else ``model`` compiled (sharing its parameters): ``torch.compile``
    in the mode of that name, or with the ``cudagraphs`` backend (CUDA graphs, no compiler)."""
    if compile not in COMPILE_MODES or compile == "auto":
        raise InputError(f"unknown compile {compile!r}; choose one of {', '.join(COMPILE_MODES[1:])}")
    if compile == "none":
        return model
    if compile == "cudagraphs":
        return _mark_step(torch.compile(model, backend="cudagraphs", dynamic=False))
    if compile == "step-graph":  # fused kernels, launched from the step's own graph (CapturedStep)
        return torch.compile(model, dynamic=False)
    compiled = torch.compile(model, mode=None if compile == "default" else compile, dynamic=False)
    return _mark_step(compiled) if compile in GRAPH_MODES else compiled


def autocast_context(precision: str, device):
    """bf16 autocast (on the device's type, CUDA or CPU) for ``bf16``; a no-op context otherwise."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def network(forward, precision: str, device):
    """A training ``forward(x, t, *labels)`` as run everywhere in this package: for ``bf16`` under
    autocast, its output cast back to ``x``'s dtype, so nothing outside the network sees a bf16
    tensor; ``forward`` itself otherwise."""
    if precision != "bf16":
        return forward

    def run(x: torch.Tensor, t: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
        with autocast_context(precision, device):
            out = forward(x, t, *labels)
        return out.to(x.dtype)

    return run


def to_memory_format(x: torch.Tensor, memory_format: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if memory_format == "channels_last" else x


def make_adamw(params, device, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused single-kernel implementation (CUDA and CPU; on CPU it takes 6.9 ms
    per step for 6.5M parameters where the default loop takes 25 ms, 1 thread). The same
    algorithm; the results agree with the default loop to float32 rounding (~1 ulp)."""
    return torch.optim.AdamW(params, fused=torch.device(device).type in ("cuda", "cpu") or None, **kwargs)


# ------------------------------------------------------------------ never stopped by a fast path
def first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


class Fallback:
    """``fast(*args)`` until it first fails where ``plain(*args)`` succeeds; from then on ``plain``,
    after one warning line. ``reset``, when given, is called before the plain retry (e.g. to drop
    gradients a failed backward left). ``path`` describes what ran."""

    def __init__(self, fast: Callable | None, plain: Callable, path: str, plain_path: str,
                 reset: Callable[[], None] | None = None):
        self.fast, self.plain, self.reset = fast, plain, reset
        self.path, self.plain_path = path, plain_path

    def __call__(self, *args, **kwargs):
        if self.fast is None:
            return self.plain(*args, **kwargs)
        try:
            return self.fast(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 — retried on the plain path below, raised if that fails too
            if self.reset is not None:
                self.reset()
            out = self.plain(*args, **kwargs)  # a real error (bad input, a bug) fails here too, and is raised
            self.fast = None
            self.path = f"{self.plain_path} (fell back from {self.path}: {first_line(e)})"
            warnings.warn(f"fast path failed, continuing on the plain path: {self.path}", FastPathWarning, stacklevel=2)
            return out


# ------------------------------------------------------------------ a whole training step as one graph
class CapturedStep:
    """``update(*batch)``, a whole training step (forward, backward, clipping, the optimiser, the
    averages), run ``warmup`` times on a side stream, then captured once as a CUDA graph and replayed
    for every later call with the batch's tensors copied into the graph's static inputs: one launch
    per step, no Python in the way (PyTorch's "whole network capture").

    ``update`` must read no tensor value on the host and take its per-step values from tensors (the
    learning rate as a tensor, the averages' β from their counts on the device), since the graph
    replays exactly what was captured. ``zero_grad`` drops the gradients before the warm-up calls and
    the capture; after it they belong to the graph, which overwrites them at every replay. The
    outputs are the graph's static tensors: copy what is kept beyond the next call. ``capture=False``
    (the CPU, tests) runs ``update`` every time instead, after ``zero_grad``."""

    def __init__(self, update: Callable, zero_grad: Callable[[], None], warmup: int = 3, capture: bool = True):
        self.update, self.zero_grad, self.warmup, self.capture = update, zero_grad, warmup, capture
        self.calls, self.graph, self.static, self.out = 0, None, None, None

    def __call__(self, *batch):
        if not self.capture or self.calls < self.warmup:
            self.calls += 1
            self.zero_grad()
            if not self.capture:
                return self.update(*batch)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.update(*batch)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.static = [b.clone() if isinstance(b, torch.Tensor) else b for b in batch]
            self.zero_grad()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.out = self.update(*self.static)
            self.graph = graph
        else:
            for s, b in zip(self.static, batch):
                if isinstance(s, torch.Tensor):
                    s.copy_(b)
        self.graph.replay()
        return self.out


# ------------------------------------------------------------------ inference
class CUDAGraphed:
    """``fn(*args)`` replayed from a CUDA graph captured once per input signature (shapes, dtypes):
    the inputs are copied into the graph's static buffers, the graph replays every kernel of ``fn``
    with one launch, and the output is returned as a new tensor (the static one is overwritten by
    the next replay). ``fn`` must be a pure function of its tensor arguments (a network in eval
    mode), with no host synchronisation."""

    def __init__(self, fn: Callable[..., torch.Tensor], warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}

    def capture(self, args: tuple[torch.Tensor, ...]):
        static = [a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture: lazy initialisation, cuDNN's plans
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may use CUDA meanwhile
            out = self.fn(*static)
        return graph, static, out

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        key = tuple((a.shape, a.dtype, a.device, a.stride()) for a in args)
        if key not in self.graphs:
            self.graphs[key] = self.capture(args)
        graph, static, out = self.graphs[key]
        for s, a in zip(static, args):
            s.copy_(a)
        graph.replay()
        return out.clone()


def inference_network(model: torch.nn.Module, path: FastPath):
    """``model`` (on its device; put in eval mode, or its bf16 copy is) as ``f(x, t, *labels)`` for inference on the fast path
    ``path``: for bf16 a copy of its weights cast to bfloat16 once (no autocast, no per-call casts of
    weights or activations), x cast in and the output cast back to x's dtype; compiled or replayed
    from CUDA graphs as ``path.compile`` says. Returns (fast call or None, plain eager call)."""
    if path.precision == "bf16":
        model = copy.deepcopy(model).to(torch.bfloat16)
    model = model.eval()
    dtype = next(model.parameters()).dtype

    def plain(x: torch.Tensor, t: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
        return model(to_memory_format(x.to(dtype), path.memory_format), t, *labels).to(x.dtype)

    if path.compile == "none":
        return None, plain
    if path.compile == "cudagraphs":
        graphed = CUDAGraphed(lambda x, t, *labels: model(x, t, *labels))

        def fast(x, t, *labels):
            return graphed(to_memory_format(x.to(dtype), path.memory_format), t, *labels).to(x.dtype)

        return fast, plain
    compiled = compile_model(model, path.compile)

    def fast(x, t, *labels):  # the output copied (cast, or cloned) before the next call can overwrite it
        return compiled(to_memory_format(x.to(dtype), path.memory_format), t, *labels).to(x.dtype, copy=True)

    return fast, plain


class Denoiser:
    """The ``denoiser(x, t[, labels])`` a sampler calls (see ``make_denoiser``); ``path`` says which path ran."""

    def __init__(self, call: Fallback):
        self.call = call

    @property
    def path(self) -> str:
        return self.call.path

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
        return self.call(x, t, *labels)


def make_denoiser(model: torch.nn.Module, device, *, precision: str = "auto", memory_format: str = "auto",
                  compile: str = "auto", work: float | None = None, role: str = "inference") -> Denoiser:
    """``model`` (moved to ``device``, in eval mode) as the ``denoiser(x, t[, labels])`` a sampler calls,
    on the fast path of the choices for ``role`` (inference, or likelihood: float32 under ``auto``; ``work``:
    the image-evaluations it will make, for ``auto``'s compile decision): weights cast once, inputs in the memory format, compiled
    or graphed, falling back to the plain eager call if that fails (``Fallback``)."""
    path = resolve(device, precision, memory_format, compile, role=role, work=work)
    set_matmul_precision(path.precision, device)
    model = model.to(device)
    if path.memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    fast, plain = inference_network(model, path)
    plain_path = replace(path, compile="none", note="").describe()
    return Denoiser(Fallback(fast, plain, path.describe(), plain_path))
