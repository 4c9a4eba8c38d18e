"""Sample-quality metrics through torch-fidelity.

Two feature extractors:
- ``ddpm-classifier`` (offline default): the data set's own classifier
  (``ddpm.classifier``), registered into torch-fidelity's registry; features are its
  penultimate embedding, logits its class scores. Weights: a classifier checkpoint.
- ``inception-v3-compat``: torch-fidelity's standard Inception-v3 FID network. Its
  weights download from the internet unless ``weights_path`` names a local copy.

Inputs are uint8 image tensors [N, C, H, W]; 1-channel images are repeated to RGB
for Inception.
"""

import torch
from torch.utils.data import Dataset

from ddpm.checkpoint import CheckpointError, load_checkpoint
from ddpm.classifier import Classifier, ClassifierConfig

EXTRACTORS = ("ddpm-classifier", "inception-v3-compat")


class TensorImages(Dataset):
    """A uint8 [N, C, H, W] tensor as the Dataset torch-fidelity reads."""

    def __init__(self, images: torch.Tensor, channels: int | None = None):
        self.images = images
        self.channels = channels

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        x = self.images[i]
        if self.channels == 3 and x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return x


def load_classifier(path, map_location="cpu") -> Classifier:
    ckpt = load_checkpoint(path, map_location)
    try:
        c = ckpt["config"]["classifier"]
        model = Classifier(ClassifierConfig(**c["arch"]), in_channels=c["in_channels"], num_classes=c["num_classes"])
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is not a classifier checkpoint: {e}") from e
    return model.eval()


def _extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class ClassifierFeatureExtractor(FeatureExtractorBase):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise ValueError("ddpm-classifier needs feature_extractor_weights_path (a classifier checkpoint)")
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
            features, logits = self.model(x.float() / 127.5 - 1.0)
            out = {"features": features, "logits": logits}
            return tuple(out[f] for f in self.features_list)

    return ClassifierFeatureExtractor


def register_classifier_extractor(name: str = "ddpm-classifier") -> None:
    """Register the classifier extractor with torch-fidelity (once per process)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, _extractor_class())


def compute_metrics(samples: torch.Tensor, reference: torch.Tensor, *, extractor: str = "ddpm-classifier",
                    weights_path=None, cuda: bool = False, batch_size: int = 500, kid_subset_size: int = 1000,
                    isc: bool = True, verbose: bool = False) -> dict[str, float]:
    """FID, KID (mean, std) and Inception Score of ``samples`` against ``reference``."""
    import torch_fidelity

    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {extractor!r}; choose one of {', '.join(EXTRACTORS)}")
    if extractor == "ddpm-classifier":
        register_classifier_extractor()
        channels = None
    else:
        channels = 3
    n = min(samples.shape[0], reference.shape[0])
    try:
        m = torch_fidelity.calculate_metrics(
            input1=TensorImages(samples, channels), input2=TensorImages(reference, channels),
            feature_extractor=extractor, feature_extractor_weights_path=None if weights_path is None else str(weights_path),
            fid=True, kid=True, isc=isc, kid_subset_size=min(kid_subset_size, n), cuda=cuda,
            batch_size=batch_size, cache=False, save_cpu_ram=True, verbose=verbose)
    except Exception as e:
        if extractor == "inception-v3-compat" and weights_path is None:
            raise RuntimeError("inception-v3-compat could not load its weights: it downloads them from the internet "
                               f"unless a local weights file is given ({e})") from e
        raise
    out = {"fid": m["frechet_inception_distance"], "kid_mean": m["kernel_inception_distance_mean"],
           "kid_std": m["kernel_inception_distance_std"]}
    if isc:
        out.update(isc_mean=m["inception_score_mean"], isc_std=m["inception_score_std"])
    return {k: float(v) for k, v in out.items()}
