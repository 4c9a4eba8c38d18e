"""Data loaders on small files written in the real formats (IDX, CIFAR pickles, PNG folders)."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_idx_dir, synthetic_images
from ddpm.data import DataError, load_split, save_split
from ddpm.datasets import load_cifar10, load_image_folder, load_mnist_like


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_through_torchvision(tmp_path, compress):
    src = make_idx_dir(tmp_path / "src", n_train=40, n_test=20, compress=compress)
    splits = load_mnist_like("fashion_mnist", src, tmp_path / "cache")
    assert splits["train"].images.shape == (40, 1, 28, 28) and splits["train"].images.dtype == torch.uint8
    assert splits["test"].labels.shape == (20,)
    expected, labels = synthetic_images(40, 0)
    assert torch.equal(splits["train"].images, expected)
    assert torch.equal(splits["train"].labels, labels.long())
    assert splits["train"].classes[0] == "T-shirt/top"


def test_missing_idx_files_without_download(tmp_path):
    with pytest.raises(DataError, match="no fashion_mnist IDX files"):
        load_mnist_like("fashion_mnist", tmp_path, tmp_path / "cache", download=False)


def test_corrupt_idx_file(tmp_path):
    src = make_idx_dir(tmp_path / "src", n_train=8, n_test=8, compress=False)
    (src / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(DataError, match=r"src/train-images-idx3-ubyte: the IDX header is cut short"):
        load_mnist_like("fashion_mnist", src, tmp_path / "cache")


def write_cifar(root, n_per_batch=4):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n_per_batch).tolist()}
        with open(base / name, "wb") as f:
            pickle.dump(batch, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return base


def test_cifar10_pickles_through_torchvision(tmp_path):
    base = write_cifar(tmp_path)
    splits = load_cifar10(tmp_path, tmp_path / "cache")
    assert splits["train"].images.shape == (20, 3, 32, 32) and splits["test"].images.shape == (4, 3, 32, 32)
    with open(base / "test_batch", "rb") as f:
        raw = pickle.load(f)
    assert torch.equal(splits["test"].images, torch.from_numpy(raw["data"].reshape(-1, 3, 32, 32)))
    assert splits["train"].classes == [f"class{i}" for i in range(10)]


def test_cifar10_missing_without_download(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_cifar10(tmp_path, tmp_path / "cache", download=False)


def test_image_folder(tmp_path):
    for c, colour in (("cats", 40), ("dogs", 200)):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (40, 30), (colour, i * 10, 0)).save(tmp_path / "imgs" / c / f"{i}.png")
    splits = load_image_folder(tmp_path / "imgs", image_size=16, channels=3, test_fraction=0.2, seed=0)
    assert splits["train"].images.shape == (8, 3, 16, 16) and splits["test"].images.shape == (2, 3, 16, 16)
    assert splits["train"].classes == ["cats", "dogs"]
    gray = load_image_folder(tmp_path / "imgs", image_size=8, channels=1, test_fraction=0.2, seed=0)
    assert gray["train"].images.shape[1] == 1


def test_split_round_trip_and_corrupt_file(tmp_path):
    images, labels = synthetic_images(6, 0)
    from ddpm.data import Split

    save_split(Split(images, labels.long(), ["a"]), tmp_path / "s.pt")
    s = load_split(tmp_path / "s.pt")
    assert torch.equal(s.images, images)
    (tmp_path / "bad.pt").write_bytes((tmp_path / "s.pt").read_bytes()[:100])
    with pytest.raises(DataError, match="bad.pt is corrupt"):
        load_split(tmp_path / "bad.pt")
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path / "missing.pt")
