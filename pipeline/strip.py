"""Denoising strips: x_T, a few intermediate x_t and x_0 of some samples, one row per
sample, recorded through the sampler's ``on_step`` callback and saved as a PNG."""

from pathlib import Path

import torch

from ddpm.pixels import to_uint8
from pipeline.common import write_image_grid


class StripRecorder:
    """Keeps the first ``rows`` images of x_T and of about ``columns`` evenly spaced steps."""

    def __init__(self, x_T: torch.Tensor, steps: int, rows: int = 8, columns: int = 10):
        self.rows = min(rows, x_T.shape[0])
        n = max(2, columns) - 1  # snapshots after steps, besides x_T
        self.keep = {round(j * steps / n) for j in range(1, n + 1)} if steps > n else set(range(1, steps + 1))
        self.frames = [to_uint8(x_T[:self.rows]).cpu()]
        self.done = 0

    def __call__(self, t: int, x_prev: torch.Tensor, pred) -> None:
        self.done += 1
        if self.done in self.keep:
            self.frames.append(to_uint8(x_prev[:self.rows]).cpu())

    def save(self, path: Path) -> None:
        """One row per sample, x_T on the left, x_0 on the right; written atomically."""
        frames = torch.stack(self.frames, dim=1)  # [rows, columns, C, H, W]
        write_image_grid(path, frames.flatten(0, 1), nrow=frames.shape[1])
