"""Sample-quality metrics through torch-fidelity.

Two feature extractors:
- ``ddpm-classifier`` (offline default): the data set's own classifier
  (``ddpm.classifier``), registered into torch-fidelity's registry; features are its
  penultimate embedding, logits its class scores. Weights: a classifier checkpoint.
- ``inception-v3-compat``: torch-fidelity's standard Inception-v3 FID network. Its
  weights download from the internet unless ``weights_path`` names a local copy.

Inputs are uint8 image tensors [N, C, H, W]; 1-channel images are repeated to RGB
for Inception.

The work is split so that a reference set is processed once: ``extract_features``
runs the extractor (features for FID/KID/precision-recall, logits for the Inception
Score), ``reference_statistics`` adds the mean and covariance and the reference's
precision/recall radii (``prc_radii``), and ``metrics_from_features`` computes FID, KID,
precision/recall and IS from two sets of features with torch-fidelity's own metric
functions. Nothing goes through torch-fidelity's on-disk cache.

Precision/recall (Kynkäänniemi et al. 2019) give every feature vector a ball reaching to its
k-th nearest neighbour in its own set. torch-fidelity's ``prc_features_to_metric`` finds the
reference's radii anew on every call: for 10,000 reference images that is a 10⁴×10⁴ distance
matrix and a k-th value per row, seconds of work repeated in every sample cell. So
``precision_recall`` takes them from the reference statistics, computed once; it is
torch-fidelity's computation otherwise (its distance function, the same comparisons, the
same result: ``tests/test_evaluation.py``).

torch-fidelity computes KID in NumPy on the host, one subset at a time, and copies every block
of distances to the host. Here KID (``kid``: the same polynomial kernel, unbiased MMD² and NumPy
subset draws) and precision/recall run on the features' device, the subsets as batched matrix
products: on a GPU they take milliseconds where the host took seconds per sample cell. They
agree with torch-fidelity to float64 rounding (``tests/test_evaluation.py``).
"""

import math
import os
import socket
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ddpm.checkpoint import CheckpointError, check_finite, load_checkpoint
from ddpm.classifier import Classifier
from ddpm.config.evaluation import EXTRACTORS, ISC_SPLITS, PRC_NEIGHBORHOOD, ClassifierConfig, too_few
from ddpm.errors import DDPMError, InputError, NonFiniteError
from ddpm.pixels import to_model_range
from ddpm.ruler import check_reference

# Seconds a download of the Inception weights may stall before it fails.
DOWNLOAD_TIMEOUT = 20.0


class ExtractorUnavailable(DDPMError, RuntimeError):
    """The feature extractor's weights can neither be read nor downloaded."""


def load_classifier(path, map_location="cpu") -> Classifier:
    ckpt = load_checkpoint(path, map_location)
    try:
        c = ckpt["config"]["classifier"]
        model = Classifier(ClassifierConfig(**c["arch"]), in_channels=c["in_channels"], num_classes=c["num_classes"])
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is not a classifier checkpoint: {e}") from e
    check_finite(ckpt["model"], f"classifier checkpoint {path}: its weights")
    return model.eval()


def _extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class ClassifierFeatureExtractor(FeatureExtractorBase):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise InputError("ddpm-classifier needs feature_extractor_weights_path (a classifier checkpoint)")
            self.model = load_classifier(feature_extractor_weights_path)

        @staticmethod
        def get_provided_features_list():
            return "features", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 1, 28, 28, dtype=torch.uint8)

        def forward(self, x):
            cin = self.model.in_channels
            if x.shape[1] != cin:  # RGB files fed to a grayscale classifier, or the reverse
                x = x.float().mean(1, keepdim=True) if cin == 1 else x.expand(-1, 3, -1, -1)
            features, logits = self.model(to_model_range(x))
            out = {"features": features, "logits": logits}
            return tuple(out[f] for f in self.features_list)

    return ClassifierFeatureExtractor


def register_classifier_extractor(name: str = "ddpm-classifier") -> None:
    """Register the classifier extractor with torch-fidelity (once per process)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, _extractor_class())


@contextmanager
def _socket_timeout(seconds: float):
    """Bound every socket operation (torch.hub's download sets no timeout of its own)."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def feature_layers(extractor: str) -> dict[str, str]:
    """torch-fidelity layer names: ``features`` (FID/KID/PRC) and ``logits`` (IS)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if extractor not in EXTRACTORS:
        raise InputError(f"unknown feature extractor {extractor!r}; choose one of {', '.join(EXTRACTORS)}")
    if extractor == "ddpm-classifier":
        register_classifier_extractor()
    cls = FEATURE_EXTRACTORS_REGISTRY[extractor]
    return {"features": cls.get_default_feature_layer_for_metric("fid"),
            "logits": cls.get_default_feature_layer_for_metric("isc")}


def create_extractor(extractor: str, weights_path=None, cuda: bool = False):
    """The torch-fidelity feature extractor, or a one-line ``ExtractorUnavailable``."""
    from torch_fidelity.utils import create_feature_extractor

    layers = feature_layers(extractor)
    if weights_path is not None and not os.path.isfile(str(weights_path)):
        raise ExtractorUnavailable(f"{extractor}: weights file {weights_path} does not exist")
    if extractor == "ddpm-classifier" and weights_path is None:
        raise ExtractorUnavailable("ddpm-classifier needs a classifier checkpoint as its weights file")
    kwargs = dict(cuda=cuda, verbose=False, feature_extractor_compile=False,
                  feature_extractor_weights_path=None if weights_path is None else str(weights_path))
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT):
            return create_feature_extractor(extractor, list(layers.values()), **kwargs)
    except (CheckpointError, ExtractorUnavailable, NonFiniteError):
        raise
    except Exception as e:
        reason = " ".join(str(e).split())[:200]  # one line
        if extractor == "inception-v3-compat" and weights_path is None:
            from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

            raise ExtractorUnavailable(
                f"inception-v3-compat: cannot download its weights from {URL_INCEPTION_V3} ({type(e).__name__}: "
                f"{reason}); set fid.weights_path to a local copy of that file, or use fid.extractor "
                f"ddpm-classifier") from e
        raise ExtractorUnavailable(f"{extractor}: cannot load weights {weights_path}: {type(e).__name__}: {reason}") from e


@torch.no_grad()
def extract_features(images: torch.Tensor, *, extractor: str = "ddpm-classifier", weights_path=None,
                     cuda: bool = False, batch_size: int = 500, progress=None, model=None) -> dict[str, torch.Tensor]:
    """``{"features": [N, D] float64, "logits": [N, K] float64}`` of uint8 images [N, C, H, W].

    ``progress``, when given, is called with the number of images of every batch.
    ``model`` reuses an extractor from ``create_extractor``.
    """
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4):
        raise InputError("images must be a uint8 tensor [N, C, H, W]")
    layers = feature_layers(extractor)
    model = model or create_extractor(extractor, weights_path, cuda)
    out: dict[str, list[torch.Tensor]] = {"features": [], "logits": []}
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size]
        if extractor == "inception-v3-compat" and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if cuda:
            x = x.cuda(non_blocking=True)
        d = model.convert_features_tuple_to_dict(model(x))
        for key, layer in layers.items():
            out[key].append(d[layer].detach().cpu().double())
        if progress is not None:
            progress(x.shape[0])
    return {k: torch.cat(v) for k, v in out.items()}


PRC_BATCH = 10000  # rows of the distance matrix at a time, as torch-fidelity's prc_batch_size


def _cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch-fidelity's ``calc_cdist_part`` (``torch.cdist`` over blocks of ``b``), left on the features' device."""
    return torch.cat([torch.cdist(a, part) for part in b.split(PRC_BATCH)], dim=1)


def prc_radii(features: torch.Tensor, neighborhood: int = PRC_NEIGHBORHOOD) -> torch.Tensor:
    """Each float32 feature vector's distance to its k-th nearest neighbour in the same set (itself
    excluded), as torch-fidelity's ``calculate_precision_recall_part`` computes it, on their device."""
    f = features.float()
    return torch.cat([_cdist(b, f).kthvalue(neighborhood + 1).values for b in f.split(PRC_BATCH)])


def precision_recall(generated: torch.Tensor, reference: torch.Tensor, reference_radii: torch.Tensor | None = None,
                     neighborhood: int = PRC_NEIGHBORHOOD) -> dict[str, float]:
    """Precision, recall and F-score of ``generated`` against ``reference`` features: torch-fidelity's
    ``prc_features_to_metric`` (``save_cpu_ram``), with the reference's radii given (``prc_radii``),
    computed on ``generated``'s device."""
    device = generated.device
    g, r = generated.float(), reference.to(device).float()
    radii_g = prc_radii(g, neighborhood)
    radii_r = prc_radii(r, neighborhood) if reference_radii is None else reference_radii.to(device)
    # recall: is each reference vector inside some generated vector's ball; precision: the other way
    recall = torch.cat([(_cdist(b, g) <= radii_g).any(dim=1).float() for b in r.split(PRC_BATCH)]).mean().item()
    precision = torch.cat([(_cdist(b, r) <= radii_r).any(dim=1).float() for b in g.split(PRC_BATCH)]).mean().item()
    return {"precision": precision, "recall": recall, "f_score": 2 * precision * recall / max(1e-5, precision + recall)}


KID_SUBSETS = 100  # torch-fidelity's kid_subsets


def kid(generated: torch.Tensor, reference: torch.Tensor, subset_size: int, *, subsets: int = KID_SUBSETS,
        seed: int = 2020, chunk: int = 10) -> dict[str, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018) as torch-fidelity's ``kid_features_to_metric``
    computes it: ``subsets`` random subsets of ``subset_size`` rows of each set (drawn by NumPy's
    ``RandomState(seed)`` in its order), the polynomial kernel k(x, y) = (x·y / d + 1)³, the unbiased
    MMD² per subset; its mean and standard deviation. In float64 on ``generated``'s device, ``chunk``
    subsets at a time."""
    n1, n2, m, d = generated.shape[0], reference.shape[0], subset_size, generated.shape[1]
    if not (1 < m <= min(n1, n2)):
        raise InputError(f"KID subset size {m} must be in [2, {min(n1, n2)}] (the smaller set's size)")
    rng = np.random.RandomState(seed)
    draws = [(rng.choice(n1, m, replace=False), rng.choice(n2, m, replace=False)) for _ in range(subsets)]
    device = generated.device
    x_all, y_all = generated.double(), reference.to(device).double()
    mmds = []
    for k in range(0, subsets, chunk):
        part = draws[k:k + chunk]
        X = x_all[torch.as_tensor(np.stack([a for a, _ in part]), device=device)]  # [c, m, d]
        Y = y_all[torch.as_tensor(np.stack([b for _, b in part]), device=device)]
        kernel = lambda a, b: (a @ b.transpose(1, 2) / d + 1) ** 3  # noqa: E731
        k_xx, k_yy, k_xy = kernel(X, X), kernel(Y, Y), kernel(X, Y)
        off_xx = k_xx.sum((1, 2)) - k_xx.diagonal(dim1=1, dim2=2).sum(1)  # Σ_{i≠j} k(x_i, x_j)
        off_yy = k_yy.sum((1, 2)) - k_yy.diagonal(dim1=1, dim2=2).sum(1)
        mmds.append((off_xx + off_yy) / (m * (m - 1)) - 2 * k_xy.sum((1, 2)) / (m * m))
    mmd = torch.cat(mmds).cpu().numpy()
    return {"kid_mean": float(np.mean(mmd)), "kid_std": float(np.std(mmd))}


def reference_statistics(features: dict[str, torch.Tensor], device=None) -> dict[str, torch.Tensor]:
    """Features plus their mean ``mu`` and covariance ``sigma`` (float64) and precision/recall radii
    ``prc_radii`` (computed on ``device``), as stored for a reference set (on the CPU)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    if features["features"].shape[0] < PRC_NEIGHBORHOOD + 1:
        raise InputError(f"reference statistics need at least {PRC_NEIGHBORHOOD + 1} images (precision/recall look "
                         f"at each image's {PRC_NEIGHBORHOOD} nearest others), got {features['features'].shape[0]}")
    check_features(features, "the reference images")
    stats = fid_features_to_statistics(features["features"].double())
    return {**features, "mu": torch.from_numpy(stats["mu"]), "sigma": torch.from_numpy(np.atleast_2d(stats["sigma"])),
            "prc_radii": prc_radii(features["features"].to(device) if device is not None else features["features"]).cpu()}


def check_features(features: dict[str, torch.Tensor], what: str) -> None:
    """``NonFiniteError`` unless the features (and logits) of ``what`` are finite: the extractor's
    weights or the images were bad, and every metric of them would be too."""
    for key, f in features.items():
        if isinstance(f, torch.Tensor) and f.is_floating_point() and not bool(f.isfinite().all()):
            rows = int((~f.isfinite()).reshape(f.shape[0], -1).any(1).sum()) if f.ndim else 1
            raise NonFiniteError(f"the {key} of {what} are not finite ({rows} of {f.shape[0] if f.ndim else 1} "
                                 "images); no metric of them would mean anything")


def metrics_from_features(generated: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], *,
                          kid_subset_size: int = 1000, isc: bool = True, seed: int = 2020,
                          device=None, label: str = "generated") -> dict[str, float]:
    """FID, KID (mean, std), precision/recall/F-score and Inception Score of ``generated``
    against ``reference`` (dicts from ``extract_features``; ``reference`` may carry
    ``mu``/``sigma``/``prc_radii`` from ``reference_statistics``): FID and IS by torch-fidelity,
    KID and precision/recall as torch-fidelity computes them, on ``device`` (default: the CPU).

    ``label`` names the first set in messages (the real-data floor's are ``real`` images).
    Refused (one line): non-finite features (``NonFiniteError``), a set too small for a metric
    (``ddpm.config.evaluation.too_few``: KID subsets larger than a set, fewer images than the
    Inception Score's splits; ``InputError``), and a metric that comes out NaN or infinite."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric

    g, r = generated["features"].double(), reference["features"].double()
    if g.shape[1] != r.shape[1]:
        raise InputError(f"feature sizes differ: generated {g.shape[1]}, reference {r.shape[1]} "
                         "(were they made by the same extractor?)")
    with_isc = isc and generated.get("logits") is not None
    for n, which, needs_isc in ((g.shape[0], label, with_isc), (r.shape[0], "reference", False)):
        short = too_few(n, kid_subset_size, needs_isc)
        if short:
            raise InputError(f"too few {which} images for the metrics: {n} ({short})")
    check_features(generated, f"the {label} images")
    check_features({k: v for k, v in reference.items() if k in ("features", "mu", "sigma", "prc_radii")},
                   "the reference images")
    s1 = fid_features_to_statistics(g)
    if "mu" in reference:
        s2 = {"mu": reference["mu"].double().numpy(), "sigma": reference["sigma"].double().numpy()}
    else:
        s2 = fid_features_to_statistics(r)
    s1["sigma"], s2["sigma"] = np.atleast_2d(s1["sigma"]), np.atleast_2d(s2["sigma"])
    m = dict(fid_statistics_to_metric(s1, s2, verbose=False))
    on = g.to(device) if device is not None else g
    m.update(kid(on, r, kid_subset_size, seed=seed))
    m.update(precision_recall(on, r, reference.get("prc_radii")))
    out = {"fid": m["frechet_inception_distance"], "kid_mean": m["kid_mean"], "kid_std": m["kid_std"],
           "precision": m["precision"], "recall": m["recall"], "f_score": m["f_score"]}
    if with_isc:
        i = isc_features_to_metric(generated["logits"], splits=ISC_SPLITS, shuffle=True, rng_seed=seed)
        out.update(isc_mean=i["inception_score_mean"], isc_std=i["inception_score_std"])
    out = {k: float(v) for k, v in out.items()}
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteError(f"the metrics {', '.join(f'{k} = {out[k]}' for k in bad)} are not finite; "
                             "nothing is written")
    return out


def compute_metrics(samples: torch.Tensor, reference: torch.Tensor, *, extractor: str = "ddpm-classifier",
                    weights_path=None, cuda: bool = False, batch_size: int = 500, kid_subset_size: int = 1000,
                    isc: bool = True) -> dict[str, float]:
    """All metrics of ``samples`` against ``reference`` images in one call (features of both extracted here)."""
    model = create_extractor(extractor, weights_path, cuda)
    kw = dict(extractor=extractor, cuda=cuda, batch_size=batch_size, model=model)
    return metrics_from_features(extract_features(samples, **kw), extract_features(reference, **kw),
                                 kid_subset_size=kid_subset_size, isc=isc)


def score(images: torch.Tensor, ref: dict, path: Path, *, extractor: str, weights, batch_size: int,
          kid_subset_size: int, device: torch.device, progress=None, label: str = "generated") -> dict:
    """FID, KID, precision, recall, … of ``images`` against the reference statistics ``ref`` (read
    from ``path``) with ``extractor`` and its ``weights`` file; statistics made for another
    extractor, weights or resolution are refused before any feature is extracted."""
    check_reference(ref, path, images, extractor, weights)
    feats = extract_features(images, extractor=extractor, weights_path=weights, cuda=device.type == "cuda",
                             batch_size=batch_size, progress=progress)
    return metrics_from_features(feats, ref, kid_subset_size=kid_subset_size, device=device, label=label)
