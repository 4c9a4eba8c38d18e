"""The data sets, read into ``ddpm.data.Split``: train and test splits as uint8 tensors.

Every loader returns a ``Split``: images uint8 [N, C, H, W], labels int64 [N] and the
class names. IDX files and image folders are read by torchvision's own dataset classes;
downloads happen only when asked for. A malformed file is refused with one line naming it.

- ``fashion_mnist`` / ``mnist``: a folder with the four IDX files
  ({train,t10k}-{images-idx3,labels-idx1}-ubyte, optionally .gz) — Debian's
  ``dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist — else
  torchvision's download into ``cache``. The files are staged (decompressed) into
  torchvision's layout under ``cache``, keyed by the path and SHA-256 of their sources, and
  their headers checked.
- ``cifar10``: a folder holding ``cifar-10-batches-py`` (python pickle batches), else
  torchvision's download. Pickles can run code, so a batch is unpickled as such only when it
  is the published file (its MD5); any other is read by an unpickler that admits only the
  types the format uses (dicts, lists, strings, bytes, ints, numpy arrays).
- ``folder``: an image folder, one sub-folder per class; resized and centre-cropped to
  ``image_size``; the test split is a seeded ``test_fraction`` of it. An image larger than
  ``ddpm.config.data.pixel_limit`` (from ``image_size``, or ``data.max_pixels``) is refused
  before it is decoded.
"""

import gzip
import hashlib
import json
import math
import pickle
import shutil
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path

from ddpm.config.data import DATASETS, DECODE_BYTES_PER_PIXEL, pixel_limit
from ddpm.data import SPLITS, DataError, Split
from ddpm.files import atomic_write, first_line

# torch and torchvision are imported inside the readers: the `check` stage calls ``check_source`` and
# ``check_files`` alone, which need neither (importing torch costs about 2 s, torchvision a second more:
# it loads torch._dynamo).

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ------------------------------------------------------------------ MNIST-like IDX
IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes, the only one these data sets use
STAGED = ".source.json"  # in the staging folder: which source files it holds


def _idx_source(src: Path, name: str) -> Path:
    plain = src / name
    return plain if plain.is_file() else src / f"{name}.gz"


def _open_idx(source: Path):
    """An IDX file for reading, decompressed when it is a .gz."""
    return gzip.open(source, "rb") if source.suffix == ".gz" else open(source, "rb")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_idx(source: Path, ndim: int, header: bytes, size: int | None) -> int:
    """The item count of an IDX file whose first bytes are ``header`` (and whose length is ``size``,
    when known); ``DataError`` naming ``source`` and what is wrong, when it is not an IDX file of
    unsigned bytes with ``ndim`` dimensions whose size matches its header."""
    expected = (IDX_UBYTE << 8) | ndim
    if len(header) < 4 or header[:2] != b"\0\0" or header[2] != IDX_UBYTE or header[3] != ndim:
        found = f"0x{header[:4].hex()}" if len(header) >= 4 else f"missing ({len(header)} bytes in all)"
        raise DataError(f"{source} is not an IDX file of {ndim}-d unsigned bytes: its magic number is {found}, "
                        f"expected 0x{expected:08x}")
    if len(header) < 4 + 4 * ndim:
        raise DataError(f"{source}: the IDX header is cut short ({len(header)} bytes)")
    dims = struct.unpack(f">{ndim}I", header[4:4 + 4 * ndim])
    needed = 4 + 4 * ndim + math.prod(dims)
    if size is not None and size != needed:
        raise DataError(f"{source}: the IDX header says {' × '.join(map(str, dims))} bytes of data, so the file "
                        f"should have {needed} bytes, it has {size} (truncated or not this format)")
    return dims[0]


def _idx_ndim(name: str) -> int:
    return 3 if "images" in name else 1


def _check_idx_counts(src: Path, counts: dict[str, int]) -> None:
    for split in ("train", "t10k"):
        images, labels = counts[f"{split}-images-idx3-ubyte"], counts[f"{split}-labels-idx1-ubyte"]
        if images != labels:
            raise DataError(f"{src}: {split}-images holds {images} images, {split}-labels {labels} labels")


def _stage_idx_files(src: Path, raw: Path) -> None:
    """Copy (decompressing .gz) the four IDX files of ``src`` into torchvision's raw/ layout, and check
    each one's header. The staging records the path and SHA-256 of the files it came from: staged files
    are reused only for the same sources, so another ``data.root``, or the same folder with other
    files, is staged afresh (and a staging left by a failed run never sticks)."""
    sources = {name: _idx_source(src, name) for name in IDX_FILES}
    record = {name: {"path": str(f.resolve()), "sha256": _sha256(f)} for name, f in sources.items()}
    stamp = raw / STAGED
    try:
        fresh = json.loads(stamp.read_text()) == record and all((raw / n).is_file() for n in IDX_FILES)
    except (OSError, ValueError):
        fresh = False
    shutil.rmtree(raw.parent / "processed", ignore_errors=True)  # torchvision would read its legacy files first
    if not fresh:
        stamp.unlink(missing_ok=True)
        raw.mkdir(parents=True, exist_ok=True)
        for name, source in sources.items():
            def copy(fout, source=source):
                with _open_idx(source) as fin:
                    shutil.copyfileobj(fin, fout)
            atomic_write(raw / name, copy)
    counts = {}
    for name, source in sources.items():
        with open(raw / name, "rb") as f:
            header = f.read(4 + 4 * _idx_ndim(name))
        counts[name] = _check_idx(source, _idx_ndim(name), header, (raw / name).stat().st_size)
    _check_idx_counts(src, counts)
    if not fresh:
        atomic_write(stamp, lambda f: f.write((json.dumps(record, indent=2) + "\n").encode()))


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


def check_files(name: str, root, cache) -> None:
    """That the local files ``check_source`` found hold the data set's format, before any work: the
    headers of IDX files (their sizes too, for uncompressed ones), CIFAR-10's batches read as
    ``load_cifar10`` reads them (nothing in them runs). ``DataError`` naming the file and what is wrong."""
    root, cache = Path(root), Path(cache)
    if name in ("fashion_mnist", "mnist") and _has_idx_files(root):
        counts = {}
        for n in IDX_FILES:
            source, size = _idx_source(root, n), None
            try:
                with _open_idx(source) as f:
                    header = f.read(4 + 4 * _idx_ndim(n))
                if source.suffix != ".gz":
                    size = source.stat().st_size
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(f"cannot read {source}: {first_line(e)}") from e
            counts[n] = _check_idx(source, _idx_ndim(n), header, size)
        _check_idx_counts(root, counts)
    elif name == "cifar10" and any((d / "cifar-10-batches-py").is_dir() for d in (root, cache)):
        _read_cifar10(root if (root / "cifar-10-batches-py").is_dir() else cache)


def load_mnist_like(name: str, root, cache, download: bool = False) -> dict[str, Split]:
    import torchvision

    cls = {"fashion_mnist": torchvision.datasets.FashionMNIST, "mnist": torchvision.datasets.MNIST}[name]
    root, cache = Path(root), Path(cache)
    raw = cache / cls.__name__ / "raw"
    check_source(name, root, cache, download)
    if _has_idx_files(root):
        try:
            _stage_idx_files(root, raw)
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            shutil.rmtree(raw, ignore_errors=True)
            raise DataError(f"cannot read IDX files in {root}: {e}") from e
    elif (raw / STAGED).exists():  # staged from a local folder, not torchvision's download: fetch the real set
        shutil.rmtree(raw, ignore_errors=True)
    out = {}
    for split in SPLITS:
        try:
            ds = cls(root=str(cache), train=split == "train", download=download)
        except Exception as e:  # what torchvision's reader refuses beyond the headers checked above
            raise DataError(f"cannot load {name} {split} split from {root} (staged in {raw}): {e!r}") from e
        out[split] = Split(ds.data[:, None].contiguous(), ds.targets.long(), list(ds.classes)).validate(f"{name}/{split}")
    return out


# ------------------------------------------------------------------ CIFAR-10
# What the python version of CIFAR-10 pickles: dicts, lists, str, bytes, int, and numpy arrays
# (rebuilt by numpy's _reconstruct or, from protocol 5, _frombuffer; bytes pickled by Python 3
# under protocol 2 go through _codecs.encode). Nothing else is ever unpickled from a batch.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    *((module, name) for module in ("builtins", "__builtin__")
      for name in ("dict", "list", "tuple", "bytes", "bytearray", "str", "int")),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only the types of ``_CIFAR_GLOBALS``: a crafted batch (one that would call
    ``os.system``, say) is refused before anything of it runs."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a CIFAR-10 batch never holds")
        if module.startswith("numpy.core"):  # numpy 2 moved numpy.core to numpy._core
            import numpy

            if hasattr(numpy, "_core"):
                module = module.replace("numpy.core", "numpy._core", 1)
        return super().find_class(module, name)


def _unpickle_cifar(path: Path, md5: str) -> dict:
    """A CIFAR-10 pickle as a dict. The published file (its MD5 is torchvision's) is the data set
    itself; any other file (re-packed, or crafted) is read by ``_CifarUnpickler``, which refuses
    every type the format does not use."""
    from torchvision.datasets.utils import check_integrity

    try:
        with open(path, "rb") as f:
            if check_integrity(str(path), md5):
                entry = pickle.load(f, encoding="latin1")  # noqa: S301 - the published file
            else:
                entry = _CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OSError) as e:
        raise DataError(f"refusing to read {path}: not a CIFAR-10 python batch ({first_line(e)})") from e
    if not isinstance(entry, dict):
        raise DataError(f"refusing to read {path}: not a CIFAR-10 python batch (a {type(entry).__name__}, "
                        "not a dict)")
    return entry


def _read_cifar_batch(path: Path, md5: str, num_classes: int) -> tuple:
    """(uint8 images [N, 3, 32, 32], int64 labels [N]) of one batch file, checked."""
    import numpy as np
    import torch

    entry = _unpickle_cifar(path, md5)
    data, labels = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise DataError(f"{path}: 'data' must be a uint8 array [N, 3072] (a CIFAR-10 batch)")
    try:
        labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: 'labels' must be a list of class indices ({first_line(e)})") from e
    if labels.shape != (data.shape[0],) or (labels.numel() and not 0 <= int(labels.min()) <= int(labels.max())
                                             < num_classes):
        raise DataError(f"{path}: 'labels' must hold one class index in [0, {num_classes}) per image")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels


def _read_cifar10(where: Path) -> dict[str, Split]:
    """The splits of ``where``/cifar-10-batches-py, read as ``_unpickle_cifar`` says and checked."""
    import torch
    import torchvision

    cifar = torchvision.datasets.CIFAR10  # the file names and published MD5s
    base = where / cifar.base_folder
    missing = [f for f, _ in cifar.train_list + cifar.test_list + [(cifar.meta["filename"], None)]
               if not (base / f).is_file()]
    if missing:
        raise DataError(f"cannot load cifar10 from {base}: {', '.join(missing)} missing")
    meta = _unpickle_cifar(base / cifar.meta["filename"], cifar.meta["md5"])
    classes = meta.get(cifar.meta["key"])
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise DataError(f"{base / cifar.meta['filename']}: '{cifar.meta['key']}' must be a list of class names")
    out = {}
    for split, files in (("train", cifar.train_list), ("test", cifar.test_list)):
        parts = [_read_cifar_batch(base / f, md5, len(classes)) for f, md5 in files]
        images, labels = torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
        out[split] = Split(images, labels, list(classes)).validate(f"cifar10/{split}")
    return out


def load_cifar10(root, cache, download: bool = False) -> dict[str, Split]:
    """CIFAR-10's python batches from ``root`` (else ``cache``, where torchvision downloads them,
    checking the archive's MD5). Read without running anything from the files: see ``_unpickle_cifar``."""
    import torchvision

    cifar = torchvision.datasets.CIFAR10
    root = Path(root)
    check_source("cifar10", root, cache, download)
    where = root if (root / cifar.base_folder).is_dir() else Path(cache)
    base = where / cifar.base_folder
    if download and where == Path(cache) and not all((base / f).is_file() for f, _ in cifar.train_list + cifar.test_list):
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(cifar.url, str(where), filename=cifar.filename, md5=cifar.tgz_md5)
        except Exception as e:
            raise DataError(f"cannot download cifar10 into {where}: {first_line(e)}") from e
    return _read_cifar10(where)


# ------------------------------------------------------------------ image folder
def _pixels(n: int) -> str:
    return f"{n / 1e6:.1f} megapixels" if n >= 100_000 else f"{n} pixels"


def _pil_loader(limit: int, image_size: int):
    """torchvision's ``pil_loader`` (RGB), refusing before decoding an image of more than ``limit`` pixels:
    ``Image.open`` reads the header only. PIL's own check (``Image.MAX_IMAGE_PIXELS``: a warning above 89
    megapixels, an error above 179) is left to this one."""
    from PIL import Image

    def load(path: str):
        with open(path, "rb") as f:
            img = Image.open(f)
            width, height = img.size
            if width * height > limit:
                raise DataError(
                    f"image {path} is {width} × {height} = {_pixels(width * height)}, more than the limit of "
                    f"{_pixels(limit)} for an image folder with image_size {image_size} (decoding it takes about "
                    f"{DECODE_BYTES_PER_PIXEL * width * height / 2**30:.1f} GiB); shrink it, or raise data.max_pixels")
            return img.convert("RGB")

    return load


@contextmanager
def _pil_unbounded():
    """PIL's decompression-bomb check off in the block (``_pil_loader`` checks the size itself)."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def load_image_folder(root, image_size: int, channels: int, test_fraction: float, seed: int,
                      max_pixels: int | None = None) -> dict[str, Split]:
    """The train and test splits of an image folder, each image resized and centre-cropped to ``image_size``;
    an image of more pixels than ``ddpm.config.data.pixel_limit(image_size, max_pixels)`` is refused
    (naming it) before it is decoded."""
    import torch
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
        ds = torchvision.datasets.ImageFolder(str(root), transform=T.Compose([T.PILToTensor(), *tf]),
                                              loader=_pil_loader(pixel_limit(image_size, max_pixels), image_size))
    except Exception as e:
        raise DataError(f"cannot read image folder {root}: {first_line(e)}") from e
    loaded = []
    with _pil_unbounded():
        for i, (file, _) in enumerate(ds.samples):
            try:
                loaded.append(ds[i][0])
            except DataError:
                raise
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
