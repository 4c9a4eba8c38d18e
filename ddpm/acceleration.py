"""The fast path, as named choices: numeric precision, memory format, compilation.

    precision      auto  the device's fast path: bf16 on CUDA, fp32 on CPU (the default)
                   fp32  plain float32 everywhere (bit-identical on CPU)
                   tf32  float32 storage, TF32 tensor-core matmuls and convolutions (CUDA only)
                   bf16  bfloat16 autocast of the network's forward pass, on CUDA or CPU; weights,
                         gradients, optimizer state, the loss, the sampler's state and the
                         diffusion tables stay float32 (or float64); on CUDA, TF32 for what
                         autocast leaves in float32
    memory_format  auto (channels_last on CUDA, contiguous on CPU) | contiguous |
                   channels_last (NHWC, what tensor-core convolutions want)
    compile        auto (default on CUDA, none on CPU) | none | default | max-autotune
                   (``torch.compile`` of the model's forward)

``auto`` is what was measured fastest on CPU (plain fp32: bf16 autocast, channels_last and
torch.compile were slower or no faster there, see the README) and what the GPU fast path
should be on CUDA (not yet measured on a GPU in this project). ``resolve`` turns the three choices into concrete ones
for a device and checks them before any work (tf32 on a CPU is an error, not a silent
fall-back); ``prepare_model`` moves a model to its device in its memory format;
``compile_model`` wraps its forward; ``network`` is the one place where the network runs
under bf16 autocast (training, sampling and the benchmark call it), its output
cast back to the input's dtype; ``make_adamw`` builds AdamW, fused into one kernel (on CUDA,
and on CPU, where the fused kernel is 3.5× faster per step than the default loop);
``make_denoiser`` gives the ``model(x, t)`` callable a sampler calls, with all of it applied.
With fp32, contiguous, none (``auto`` on a CPU) every one of them is a no-op.
"""

import contextlib
from dataclasses import dataclass

import torch

from ddpm.errors import InputError

PRECISIONS = ("auto", "fp32", "tf32", "bf16")
# what a network's own forward can run in (``network``): tf32 is process-wide (``set_matmul_precision``)
NETWORK_PRECISIONS = tuple(p for p in PRECISIONS if p != "tf32")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
COMPILE_MODES = ("auto", "none", "default", "max-autotune")


@dataclass(frozen=True)
class FastPath:
    """Concrete choices (no ``auto``) for one device."""

    precision: str = "fp32"
    memory_format: str = "contiguous"
    compile: str = "none"


# what ``auto`` means, per device type
AUTO = {"cuda": FastPath("bf16", "channels_last", "default"), "cpu": FastPath("fp32", "contiguous", "none")}


def resolve(device, precision: str = "auto", memory_format: str = "auto", compile: str = "auto") -> FastPath:
    """The concrete choices for ``device``; ValueError naming the option when one is unknown or needs CUDA."""
    for name, value, allowed in (("precision", precision, PRECISIONS), ("memory_format", memory_format, MEMORY_FORMATS),
                                 ("compile", compile, COMPILE_MODES)):
        if value not in allowed:
            raise InputError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
    kind = torch.device(device).type
    auto = AUTO.get(kind, AUTO["cpu"])
    path = FastPath(auto.precision if precision == "auto" else precision,
                    auto.memory_format if memory_format == "auto" else memory_format,
                    auto.compile if compile == "auto" else compile)
    if path.precision == "tf32" and kind != "cuda":
        raise InputError(f"precision 'tf32' needs a CUDA device (got {device}); use fp32 or bf16 on CPU")
    return path


def set_matmul_precision(precision: str, device) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on CUDA when precision is tf32 or bf16.

    This is process-wide state (PyTorch has no per-model switch); fp32 sets it back to IEEE."""
    if torch.device(device).type != "cuda":
        return
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


def compile_model(model: torch.nn.Module, compile: str = "none"):
    """``model`` itself for ``none``, else ``torch.compile(model, mode=...)`` sharing its parameters."""
    if compile not in COMPILE_MODES or compile == "auto":
        raise InputError(f"unknown compile {compile!r}; choose one of {', '.join(COMPILE_MODES[1:])}")
    if compile == "none":
        return model
    return torch.compile(model, mode=None if compile == "default" else compile)


def autocast_context(precision: str, device):
    """bf16 autocast (on the device's type, CUDA or CPU) for ``bf16``; a no-op context otherwise."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def network(forward, precision: str, device):
    """``forward(x, t, *labels)`` as run everywhere in this package: for ``bf16`` under autocast,
    its output cast back to ``x``'s dtype, so nothing outside the network sees a bf16 tensor;
    ``forward`` itself otherwise."""
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


def make_denoiser(model: torch.nn.Module, device, *, precision: str = "auto", memory_format: str = "auto",
                  compile: str = "auto"):
    """``model`` (prepared, in eval mode) as the ``denoiser(x, t[, labels])`` a sampler calls: inputs in the
    memory format, the forward compiled and run through ``network`` (the precision's autocast)."""
    path = resolve(device, precision, memory_format, compile)
    model = prepare_model(model, device, **vars(path)).eval()
    forward = network(compile_model(model, path.compile), path.precision, device)

    def denoiser(x: torch.Tensor, t: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
        return forward(to_memory_format(x, path.memory_format), t, *labels)

    return denoiser
