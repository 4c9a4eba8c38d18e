"""The reference statistics that stage `fid_ref` writes and stages `fid` and `fid_floor`
read: their file format, the key that records what they were made from, the extractor
weights they depend on, and the scoring of images against them. Shared by these stages, so
that none imports another."""

import hashlib
from pathlib import Path

import torch

from ddpm.data import DataError
from ddpm.files import load_torch_file
from ddpm.metrics import extract_features, metrics_from_features
from pipeline.common import progress, tensor_sha256

FORMAT = "ddpm-reference/1"


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def reference_key(images: torch.Tensor, split: str, extractor: str, weights) -> dict:
    """What a reference set's statistics depend on: data, split, extractor, resolution."""
    return {"data_sha256": tensor_sha256(images), "split": split, "extractor": extractor,
            "weights_sha256": None if weights is None else file_sha256(weights),
            "resolution": list(images.shape[1:])}


def extractor_weights(extractor: str, weights_path, classifier: Path):
    """The weights file the extractor reads: the classifier checkpoint, or fid.weights_path."""
    weights = classifier if extractor == "ddpm-classifier" else weights_path
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"feature extractor weights {weights} do not exist")
    return weights


def load_reference(path: Path) -> dict:
    ref = load_torch_file(path, DataError, f"reference statistics {path} do not exist (run the fid_ref stage first)",
                          f"reference statistics {path} are corrupt")
    if not isinstance(ref, dict) or ref.get("format") != FORMAT:
        raise DataError(f"{path} is not a {FORMAT} file")
    return ref


def check_reference(ref: dict, path: Path, images: torch.Tensor, extractor: str, weights) -> None:
    """Refuse reference statistics made for another extractor, weights or resolution."""
    key = ref["key"]
    expected = {"extractor": extractor, "weights_sha256": None if weights is None else file_sha256(weights),
                "resolution": list(images.shape[1:])}
    stale = [k for k, v in expected.items() if key.get(k) != v]
    if stale:
        raise DataError(f"reference statistics {path} were made for another {', '.join(stale)} "
                        f"({', '.join(f'{k}={key.get(k)}' for k in stale)}): run the fid_ref stage again")


def score(images: torch.Tensor, ref: dict, path: Path, f, classifier: Path, dev: torch.device, desc: str) -> dict:
    """FID, KID, precision, recall, … of ``images`` against the reference statistics ``ref`` (read
    from ``path``), with the extractor of the ``fid`` params ``f``; statistics made for another
    extractor, weights or resolution are refused before any feature is extracted."""
    weights = extractor_weights(f.extractor, f.weights_path, classifier)
    check_reference(ref, path, images, f.extractor, weights)
    with progress(images.shape[0], desc) as bar:
        feats = extract_features(images, extractor=f.extractor, weights_path=weights, cuda=dev.type == "cuda",
                                 batch_size=f.batch_size, progress=bar)
    return metrics_from_features(feats, ref, kid_subset_size=f.kid_subset_size, device=dev)
