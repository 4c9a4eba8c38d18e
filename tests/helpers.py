"""Helpers the tests import by name: the repository root, tiny data sets written in the real
file formats, tiny params (the fixtures that use them are in conftest.py)."""

import gzip
import struct
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def write_idx(path: Path, tensor: torch.Tensor, compress: bool) -> None:
    """Write a uint8 tensor as an IDX file (magic 0x00000800 | ndim, big-endian dims)."""
    header = struct.pack(">I", 0x0800 | tensor.ndim) + b"".join(struct.pack(">I", d) for d in tensor.shape)
    data = header + tensor.contiguous().numpy().tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def synthetic_images(n: int, seed: int, size: int = 28, channels: int = 1):
    """Class-dependent images: class k is a bright horizontal bar at row band k, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 40, (n, channels, size, size), generator=g)
    band = size // 10
    for i, k in enumerate(labels.tolist()):
        images[i, :, k * band:(k + 1) * band + 1, 2:size - 2] = 220
    return images.to(torch.uint8), labels.to(torch.uint8)


def make_idx_dir(root: Path, n_train: int = 256, n_test: int = 128, compress: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_images(n, seed)
        write_idx(root / f"{split}-images-idx3-ubyte", images[:, 0], compress)
        write_idx(root / f"{split}-labels-idx1-ubyte", labels, compress)
    return root


def tiny_params(data_root: Path) -> dict:
    """A params.yaml that runs the whole pipeline in seconds on synthetic data."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["data"].update(root=str(data_root), download=False)
    p["model"].update(ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[14], dropout=0.0)
    p["train"].update(steps=6, batch_size=8, warmup_steps=2, log_every=2, ema_snapshot_every=2)
    p["classifier"].update(steps=20, batch_size=32, arch={"width": 8, "feature_dim": 16})
    p["sample"].update(steps=[2, 3], num_samples=24, batch_size=12)
    p["fid"].update(batch_size=64, kid_subset_size=12)
    p["nll"].update(num_images=2, batch_size=2)  # the bound costs T network passes per batch
    p["denoise"].update(num_images=32, batch_size=32)
    return p
