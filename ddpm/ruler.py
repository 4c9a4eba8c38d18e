"""The ruler FIDs are measured with: a feature extractor, its weights, and the reference
statistics of the held-out split.

Two FIDs are comparable only when measured with the same ruler. Its **identity** (``identity``)
is the extractor's name, the SHA-256 of its weights file (the classifier checkpoint of
``ddpm-classifier``, the Inception weights of ``inception-v3-compat``) and the SHA-256 of the
reference statistics file, and ``id``, 12 hex digits of their hash. Every FID the pipeline
writes carries it. Retraining the classifier (on a GPU, where training is not bit-reproducible)
or recomputing the statistics makes a new ruler, with a new ``id``.

The **reference statistics** file (``FORMAT``) holds the reference split's features, their mean
and covariance and the precision/recall radii (``ddpm.metrics.reference_statistics``), and a
``key`` that records what they were made from (``reference_key``): ``check_reference`` refuses
statistics made for another extractor, weights or resolution before any feature is extracted.

A **pinned ruler** (``PINNED``) is a folder holding the files of a ruler (the classifier
checkpoint, the statistics and their ``info.json``, the classifier's metrics) and ``ruler.json``,
its identity. ``read_pinned`` checks every file against it, so a folder that was changed by hand
is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ddpm.data import DataError
from ddpm.files import file_sha256, load_torch_file, tensor_sha256

if TYPE_CHECKING:  # torch itself where a tensor is read: `check` reads a pinned ruler without it
    import torch

FORMAT = "ddpm-reference/1"
PINNED = "ddpm-ruler/1"
PINNED_FILES = {"weights": "classifier.pt", "reference": "stats.pt", "reference_info": "info.json",
                "classifier_metrics": "classifier.json"}  # role → file name in a pinned ruler's folder


def identity(extractor: str, weights_sha256: str | None, reference_sha256: str) -> dict:
    """The ruler's identity: its parts and ``id``, the first 12 hex digits of their SHA-256."""
    parts = {"extractor": extractor, "weights_sha256": weights_sha256, "reference_sha256": reference_sha256}
    return {"id": hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12], **parts}


def of_files(extractor: str, weights, reference) -> dict:
    """The identity of the ruler made of the weights file ``weights`` (None: the extractor's built-in
    download, unknown here) and the reference statistics file ``reference``."""
    return identity(extractor, None if weights is None else file_sha256(weights), file_sha256(reference))


def reference_key(images: torch.Tensor, split: str, extractor: str, weights) -> dict:
    """What a reference set's statistics depend on: data, split, extractor, its weights, resolution."""
    return {"data_sha256": tensor_sha256(images), "split": split, "extractor": extractor,
            "weights_sha256": None if weights is None else file_sha256(weights),
            "resolution": list(images.shape[1:])}


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


def read_pinned(folder: Path) -> dict:
    """A pinned ruler's ``ruler.json``, with each of its files checked against the SHA-256 it records
    and the identity recomputed; ``DataError`` naming the folder and the file at fault."""
    record = folder / "ruler.json"
    if not record.is_file():
        raise DataError(f"fid.ruler {folder} is not a pinned ruler: it has no ruler.json "
                        "(python -m pipeline ruler pin makes one)")
    try:
        meta = json.loads(record.read_text())
    except ValueError as e:
        raise DataError(f"{record} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != PINNED or not isinstance(meta.get("files"), dict):
        raise DataError(f"{record} is not a {PINNED} record")
    for role, sha in meta["files"].items():
        path = folder / PINNED_FILES.get(role, role)
        if not path.is_file():
            raise DataError(f"pinned ruler {folder}: {path.name} is missing")
        if file_sha256(path) != sha:
            raise DataError(f"pinned ruler {folder}: {path.name} has changed since it was pinned (its SHA-256 "
                            "differs from ruler.json's): pin a new ruler instead of editing one")
    files = meta["files"]
    expected = identity(meta.get("extractor"), files.get("weights", meta.get("weights_sha256")), files["reference"])
    if meta.get("ruler") != expected:
        raise DataError(f"{record}: its identity does not match its files")
    return meta


INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's download, in torch.hub's cache


def weights_file(extractor: str, weights_path, classifier) -> Path | None:
    """The weights file the extractor reads: the classifier checkpoint ``classifier`` of
    ``ddpm-classifier``; ``weights_path`` of ``inception-v3-compat``, else the copy torch-fidelity
    downloaded into torch.hub's cache when there is one (None before the first download)."""
    if extractor == "ddpm-classifier":
        weights = Path(classifier)
    elif weights_path is not None:
        weights = Path(weights_path)
    else:
        import torch

        cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        return cached if cached.is_file() else None
    if not weights.is_file():
        raise FileNotFoundError(f"feature extractor weights {weights} do not exist")
    return weights
