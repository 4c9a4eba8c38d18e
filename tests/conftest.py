"""Shared fixtures: tiny data sets written in the real file formats, tiny params."""

import gzip
import os
import struct
from pathlib import Path

import pytest
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


# train logs live to MLflow unless told not to; a fresh sqlite database per test workspace costs
# seconds, so the tests that are not about MLflow train without it (test_live and test_e2e turn it on)
os.environ["PIPELINE_LIVE_MLFLOW"] = "0"

FIGURES: list[str] = []


@pytest.fixture(scope="session")
def figure():
    """``figure("text")`` adds a line to the "figures" section of the test summary (counts a
    test measured, e.g. how many bad inputs it tried)."""
    return FIGURES.append


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module of tiny tensors: faster than several, and far
    faster on a shared, loaded machine (and like the stage subprocesses). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory) -> Path:
    return make_idx_dir(tmp_path_factory.mktemp("idx"))


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


@pytest.fixture
def params_file(tmp_path, idx_dir) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(idx_dir)))
    return path
