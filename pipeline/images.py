"""PNG grids of uint8 images, and the denoising strip a sampler's ``on_step`` records."""

from pathlib import Path

import torch

from ddpm.pixels import to_uint8
from pipeline.outputs import write_atomic


def write_image_grid(path, images: torch.Tensor, nrow: int, padding: int = 2) -> None:
    """uint8 images [N, C, H, W] (N ≥ 2) as one RGB PNG grid, ``nrow`` images per row with
    ``padding`` black pixels around each: torchvision's ``save_image(make_grid(...))`` layout and
    bytes (``tests/test_performance.py``), tiled here and encoded by PIL, because importing
    torchvision costs every sample cell a second or more (it loads torch._dynamo). Atomic."""
    import io

    from PIL import Image

    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    grid = torch.zeros(rows * (h + padding) + padding, cols * (w + padding) + padding, 3, dtype=torch.uint8)
    tiles = images.expand(-1, 3, -1, -1) if c == 1 else images
    for i, tile in enumerate(tiles):
        y, x = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        grid[y:y + h, x:x + w] = tile.permute(1, 2, 0)
    png = io.BytesIO()
    Image.fromarray(grid.numpy()).save(png, format="png")
    write_atomic(path, png.getvalue())


class StripRecorder:
    """Keeps the first ``rows`` images of x_T and of about ``columns`` evenly spaced steps of a
    sampler run (its ``on_step``); ``save`` writes them as one row per sample, x_T … x_0."""

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
