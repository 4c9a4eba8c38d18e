"""Data sets as uint8 tensors.

Every loader returns a ``Split``: images uint8 [N, C, H, W], labels int64 [N] and the
class names. Reading goes through torchvision's own dataset classes (its IDX, CIFAR
pickle and image-folder readers); downloads happen only when asked for.

- ``fashion_mnist`` / ``mnist``: a folder with the four IDX files
  ({train,t10k}-{images-idx3,labels-idx1}-ubyte, optionally .gz) — Debian's
  ``dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist — else
  torchvision's download into ``cache``.
- ``cifar10``: a folder holding ``cifar-10-batches-py`` (python pickle batches), else
  torchvision's download.
- ``folder``: an image folder, one sub-folder per class; resized and centre-cropped to
  ``image_size``; the test split is a seeded ``test_fraction`` of it.
"""

import gzip
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm.errors import InputError
from ddpm.files import atomic_save, first_line, load_torch_file

# torchvision is imported inside the readers: importing it costs a second or more (it loads
# torch._dynamo), and every stage imports this module for load_split alone.

DATASETS = ("fashion_mnist", "mnist", "cifar10", "folder")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SPLITS = ("train", "test")


class DataError(InputError):
    """Data files are missing or unreadable."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]

    def validate(self, name: str = "split") -> "Split":
        im, lb = self.images, self.labels
        if not (isinstance(im, torch.Tensor) and im.dtype == torch.uint8 and im.ndim == 4):
            raise DataError(f"{name}: images must be a uint8 tensor [N, C, H, W]")
        if im.shape[1] not in (1, 3):
            raise DataError(f"{name}: images must have 1 or 3 channels, got {im.shape[1]}")
        if not (isinstance(lb, torch.Tensor) and lb.ndim == 1 and lb.shape[0] == im.shape[0]):
            raise DataError(f"{name}: labels must be a tensor [N] matching {im.shape[0]} images")
        if im.shape[0] == 0:
            raise DataError(f"{name}: no images")
        return self

    def to_dict(self) -> dict:
        return {"images": self.images, "labels": self.labels, "classes": list(self.classes)}


def save_split(split: Split, path) -> None:
    atomic_save(split.validate(str(path)).to_dict(), path)


def load_split(path) -> Split:
    path = Path(path)
    split = load_torch_file(path, DataError, f"data file {path} does not exist (run the prepare stage first)",
                            f"data file {path} is corrupt or not a prepared split",
                            parse=lambda d: Split(d["images"], d["labels"].long(), list(d["classes"])))
    return split.validate(str(path))


# ------------------------------------------------------------------ MNIST-like IDX
def _stage_idx_files(src: Path, raw: Path) -> None:
    """Copy (decompressing .gz) the four IDX files into torchvision's raw/ layout."""
    raw.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        dst = raw / name
        if dst.exists():
            continue
        plain, gz = src / name, src / f"{name}.gz"
        tmp = raw / f".{name}.tmp"
        if plain.is_file():
            shutil.copyfile(plain, tmp)
        else:
            with gzip.open(gz, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        tmp.replace(dst)


def _has_idx_files(src: Path) -> bool:
    return all((src / n).is_file() or (src / f"{n}.gz").is_file() for n in IDX_FILES)


def check_source(name: str, root, cache, download: bool = False) -> None:
    """Raise ``DataError`` when the files of data set ``name`` are not where its loader
    looks (``root``, or ``cache`` for CIFAR-10) and cannot be downloaded; reads nothing."""
    root, cache = Path(root), Path(cache)
    if name in ("fashion_mnist", "mnist"):
        if not _has_idx_files(root) and not download:
            raise DataError(f"no {name} IDX files ({', '.join(IDX_FILES)}[.gz]) in {root}, and download is off")
    elif name == "cifar10":
        if not any((d / "cifar-10-batches-py").is_dir() for d in (root, cache)) and not download:
            raise DataError(f"no cifar-10-batches-py folder in {root}, and download is off")
    elif name == "folder":
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist")
        if not any(d.is_dir() for d in root.iterdir()):
            raise DataError(f"image folder {root} has no class sub-folders")
    else:
        raise DataError(f"unknown data set {name!r} (one of {', '.join(DATASETS)})")


def load_mnist_like(name: str, root, cache, download: bool = False) -> dict[str, Split]:
    import torchvision

    cls = {"fashion_mnist": torchvision.datasets.FashionMNIST, "mnist": torchvision.datasets.MNIST}[name]
    root, cache = Path(root), Path(cache)
    raw = cache / cls.__name__ / "raw"
    check_source(name, root, cache, download)
    if _has_idx_files(root):
        try:
            _stage_idx_files(root, raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            shutil.rmtree(raw, ignore_errors=True)
            raise DataError(f"cannot read IDX files in {root}: {e}") from e
    out = {}
    for split in SPLITS:
        try:
            ds = cls(root=str(cache), train=split == "train", download=download)
        except Exception as e:  # torchvision asserts on malformed IDX headers
            raise DataError(f"cannot load {name} {split} split from {root} (staged in {raw}): {e!r}") from e
        out[split] = Split(ds.data[:, None].contiguous(), ds.targets.long(), list(ds.classes)).validate(f"{name}/{split}")
    return out


# ------------------------------------------------------------------ CIFAR-10
def _cifar10_reader():
    """torchvision's CIFAR-10 reader, with integrity meaning the batch files exist (md5 checked only on download)."""
    import torchvision

    class _CIFAR10(torchvision.datasets.CIFAR10):
        meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}

        def _check_integrity(self) -> bool:
            base = Path(self.root) / self.base_folder
            return all((base / f).is_file() for f, _ in self.train_list + self.test_list)

    return _CIFAR10


def load_cifar10(root, cache, download: bool = False) -> dict[str, Split]:
    import torchvision

    root = Path(root)
    check_source("cifar10", root, cache, download)
    where = root if (root / "cifar-10-batches-py").is_dir() else Path(cache)
    out = {}
    for split in SPLITS:
        try:
            cls = torchvision.datasets.CIFAR10 if download and where == Path(cache) else _cifar10_reader()
            ds = cls(root=str(where), train=split == "train", download=download and where == Path(cache))
        except Exception as e:
            raise DataError(f"cannot load cifar10 {split} split from {where}: {e}") from e
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        out[split] = Split(images, torch.tensor(ds.targets, dtype=torch.long), list(ds.classes)).validate(f"cifar10/{split}")
    return out


# ------------------------------------------------------------------ image folder
def load_image_folder(root, image_size: int, channels: int, test_fraction: float, seed: int) -> dict[str, Split]:
    import torchvision
    from torchvision.transforms import v2 as T

    root = Path(root)
    check_source("folder", root, root)
    if image_size < 1:
        raise DataError("an image folder needs data.image_size >= 1")
    tf = [T.Resize(image_size), T.CenterCrop(image_size)]
    if channels == 1:
        tf.append(T.Grayscale(1))
    try:
        ds = torchvision.datasets.ImageFolder(str(root), transform=T.Compose([T.PILToTensor(), *tf]))
    except Exception as e:
        raise DataError(f"cannot read image folder {root}: {first_line(e)}") from e
    loaded = []
    for i, (file, _) in enumerate(ds.samples):
        try:
            loaded.append(ds[i][0])
        except Exception as e:  # truncated or not an image: name the file
            raise DataError(f"cannot read image {file} in image folder {root}: {first_line(e)}") from e
    images = torch.stack(loaded)
    if images.shape[1] != channels:
        images = images[:, :1].expand(-1, 3, -1, -1) if channels == 3 else images[:, :channels]
    labels = torch.tensor(ds.targets, dtype=torch.long)
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(test_fraction * len(ds)))
    if n_test >= len(ds):
        raise DataError(f"image folder {root} has {len(ds)} images: too few for a test split")
    test_idx, train_idx = perm[:n_test].sort().values, perm[n_test:].sort().values
    return {
        "train": Split(images[train_idx].contiguous(), labels[train_idx], list(ds.classes)).validate("folder/train"),
        "test": Split(images[test_idx].contiguous(), labels[test_idx], list(ds.classes)).validate("folder/test"),
    }


def resize_split(split: Split, image_size: int) -> Split:
    """Resize square images to ``image_size`` (antialiased bilinear)."""
    if image_size in (0, split.images.shape[-1]):
        return split
    from torchvision.transforms import v2 as T

    images = T.functional.resize(split.images, [image_size, image_size], antialias=True)
    return Split(images.contiguous(), split.labels, split.classes)
