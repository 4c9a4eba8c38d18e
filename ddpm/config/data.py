"""The data sets ``ddpm.datasets`` reads."""

DATASETS = ("fashion_mnist", "mnist", "cifar10", "folder")
NATIVE_SIZE = {"fashion_mnist": 28, "mnist": 28, "cifar10": 32}  # an image folder has none


def native_size(name: str, image_size: int = 0) -> int | None:
    """The side of the images a data set gives: ``image_size`` when it resizes them, else its own
    (None for an image folder, which has no size of its own)."""
    return image_size or NATIVE_SIZE.get(name)
