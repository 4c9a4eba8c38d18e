"""Pixel conversions between 8-bit images and the model's range.

Images are stored as uint8 [0, 255]; the diffusion works on floats in [-1, 1] (Ho et al. 2020,
sec. 3.3: "data consisting of integers in {0, 1, ..., 255} scaled linearly to [-1, 1]").
"""

import torch


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] → uint8 [0, 255], rounding to the nearest level."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def differing_share(a: torch.Tensor, b: torch.Tensor, levels: int = 1) -> float | None:
    """The share of pixels in which the uint8 images ``a`` and ``b`` differ, when no pixel is more than
    ``levels`` grey levels apart (the same images up to rounding); None otherwise, or when their
    shapes differ."""
    if a.shape != b.shape or (a.int() - b.int()).abs().max() > levels:
        return None
    return (a != b).float().mean().item()
