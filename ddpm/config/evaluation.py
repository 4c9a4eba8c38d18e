"""The FID's feature extractors and the offline one's size (``ddpm.classifier``, ``ddpm.metrics``)."""

from dataclasses import dataclass
from typing import Annotated

from annotated_types import Ge

# The FID's feature extractors: the pipeline's own classifier, or torchvision's Inception-v3 in
# torch-fidelity's FID variant.
EXTRACTORS = ("ddpm-classifier", "inception-v3-compat")


@dataclass
class ClassifierConfig:
    width: Annotated[int, Ge(1)] = 32  # bounds: metadata the params schema enforces
    feature_dim: Annotated[int, Ge(1)] = 128
