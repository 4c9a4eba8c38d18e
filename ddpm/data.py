"""A data set's splits as the pipeline keeps them: uint8 images [N, C, H, W], int64 labels [N]
and the class names (``Split``), saved and loaded as one torch file each (``save_split``,
``load_split``: a malformed file is refused with one line naming it). The readers of the
data sets themselves are ``ddpm.datasets``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ddpm.errors import InputError
from ddpm.files import atomic_save, load_torch_file

if TYPE_CHECKING:
    import torch

# torch is imported where a tensor is made or checked: the `check` stage reads the data set's files
# (``ddpm.datasets``) without importing it (about 2 s of every pipeline run)

SPLITS = ("train", "test")


class DataError(InputError):
    """Data files are missing or unreadable."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]
    dataset: str = ""  # the data set it came from (``ddpm.config.data.DATASETS``)

    def validate(self, name: str = "split") -> Split:
        import torch

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
        return {"images": self.images, "labels": self.labels, "classes": list(self.classes), "dataset": self.dataset}


def save_split(split: Split, path) -> None:
    atomic_save(split.validate(str(path)).to_dict(), path)


def load_split(path) -> Split:
    path = Path(path)
    split = load_torch_file(path, DataError, f"data file {path} does not exist (run the prepare stage first)",
                            f"data file {path} is corrupt or not a prepared split",
                            parse=lambda d: Split(d["images"], d["labels"].long(), list(d["classes"]),
                                                  str(d.get("dataset", ""))))
    return split.validate(str(path))
