"""The device a stage computes on (``--device``)."""

import torch

from ddpm.errors import InputError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but CUDA is not available")
    return torch.device(device)

