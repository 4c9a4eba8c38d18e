"""The FID's feature extractors, the offline one's size (``ddpm.classifier``, ``ddpm.metrics``), and how
many images each metric needs to mean anything (``too_few``: the params check and the metrics both ask)."""

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


ISC_SPLITS = 10  # the Inception Score is the mean over this many parts of the set (torch-fidelity's default)
PRC_NEIGHBORHOOD = 3  # precision/recall: the k of each vector's k-th nearest neighbour (torch-fidelity's default)


def too_few(n: int, kid_subset_size: int, isc: bool = True) -> str | None:
    """Why a set of ``n`` images is too small for the metrics (KID draws subsets of ``kid_subset_size``
    images, the Inception Score splits the set into ISC_SPLITS parts, precision/recall reach to each
    image's PRC_NEIGHBORHOOD-th nearest neighbour other than itself), or None. Fewer images would make
    a metric NaN (an empty part) or quietly measure something else (a smaller KID subset)."""
    needs = [(kid_subset_size, f"KID draws subsets of kid_subset_size = {kid_subset_size} images"),
             (PRC_NEIGHBORHOOD + 1, f"precision/recall look at each image's {PRC_NEIGHBORHOOD} nearest other images")]
    if isc:
        needs.append((ISC_SPLITS, f"the Inception Score splits the set into {ISC_SPLITS} parts"))
    short = [why for k, why in needs if n < k]
    return "; ".join(short) or None
