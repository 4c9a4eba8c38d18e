"""The GPU fast path, as named choices: numeric precision, memory format, compilation.

    precision      fp32  plain float32 everywhere (the default; bit-identical on CPU)
                   tf32  float32 storage, TF32 tensor-core matmuls and convolutions (CUDA)
                   bf16  bfloat16 autocast for the forward pass and loss (CUDA); weights,
                         gradients and optimizer state stay float32; TF32 for what
                         autocast leaves in float32
    memory_format  contiguous | channels_last (NHWC, what tensor-core convolutions want)
    compile        none | default | max-autotune  (``torch.compile`` of the model's forward)

``prepare_model`` moves a model to its device in its memory format and checks the
choices before any work (tf32/bf16 on a CPU is an error, not a silent fall-back);
``compile_model`` wraps its forward; ``autocast_context`` is the region that runs in
bf16; ``make_adamw`` builds AdamW, fused into one kernel on CUDA; ``make_denoiser``
gives the ``model(x, t)`` callable a sampler calls, with all three applied. With the defaults
(fp32, contiguous, none) every one of them is a no-op, so CPU runs are unchanged.
"""

import contextlib

import torch

PRECISIONS = ("fp32", "tf32", "bf16")
MEMORY_FORMATS = ("contiguous", "channels_last")
COMPILE_MODES = ("none", "default", "max-autotune")


def check_choices(device, precision: str = "fp32", memory_format: str = "contiguous", compile: str = "none") -> None:
    """Raise ValueError naming the option when a choice is unknown or needs CUDA."""
    for name, value, allowed in (("precision", precision, PRECISIONS), ("memory_format", memory_format, MEMORY_FORMATS),
                                 ("compile", compile, COMPILE_MODES)):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
    if precision != "fp32" and torch.device(device).type != "cuda":
        raise ValueError(f"precision {precision!r} needs a CUDA device (got {device}); use fp32 on CPU")


def set_matmul_precision(precision: str, device) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on CUDA when precision is tf32 or bf16.

    This is process-wide state (PyTorch has no per-model switch); fp32 sets it back to IEEE."""
    if torch.device(device).type != "cuda":
        return
    mode = "ieee" if precision == "fp32" else "tf32"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


def prepare_model(model: torch.nn.Module, device, *, precision: str = "fp32", memory_format: str = "contiguous",
                  compile: str = "none") -> torch.nn.Module:
    """Check the choices, then move ``model`` (in place) to ``device`` in ``memory_format``."""
    check_choices(device, precision, memory_format, compile)
    set_matmul_precision(precision, device)
    model = model.to(device)
    if memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return model


def compile_model(model: torch.nn.Module, compile: str = "none"):
    """``model`` itself for ``none``, else ``torch.compile(model, mode=...)`` sharing its parameters."""
    if compile not in COMPILE_MODES:
        raise ValueError(f"unknown compile {compile!r}; choose one of {', '.join(COMPILE_MODES)}")
    if compile == "none":
        return model
    return torch.compile(model, mode=None if compile == "default" else compile)


def autocast_context(precision: str, device):
    """bf16 autocast on CUDA for ``bf16``; a no-op context otherwise."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_memory_format(x: torch.Tensor, memory_format: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if memory_format == "channels_last" else x


def make_adamw(params, device, **kwargs) -> torch.optim.AdamW:
    """AdamW; the fused single-kernel implementation on CUDA, PyTorch's default elsewhere."""
    fused = True if torch.device(device).type == "cuda" else None
    return torch.optim.AdamW(params, fused=fused, **kwargs)


def make_denoiser(model: torch.nn.Module, device, *, precision: str = "fp32", memory_format: str = "contiguous",
                  compile: str = "none"):
    """``model`` (prepared, in eval mode) as the ``denoiser(x, t)`` a sampler calls: inputs in
    ``memory_format``, the forward compiled and run under ``precision``'s autocast."""
    model = prepare_model(model, device, precision=precision, memory_format=memory_format, compile=compile).eval()
    forward = compile_model(model, compile)

    def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast_context(precision, device):
            return forward(to_memory_format(x, memory_format), t)

    return denoiser
