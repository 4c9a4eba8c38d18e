"""The data sets ``ddpm.datasets`` reads, and the largest image of an image folder it decodes."""

DATASETS = ("fashion_mnist", "mnist", "cifar10", "folder")
NATIVE_SIZE = {"fashion_mnist": 28, "mnist": 28, "cifar10": 32}  # an image folder has none


def native_size(name: str, image_size: int = 0) -> int | None:
    """The side of the images a data set gives: ``image_size`` when it resizes them, else its own
    (None for an image folder, which has no size of its own)."""
    return image_size or NATIVE_SIZE.get(name)


# An image folder's images are decoded whole before they are resized, so a size limit is checked on the file's
# header first. Decoding (the image, its RGB copy, its tensor, the resize) takes about DECODE_BYTES_PER_PIXEL at
# the peak: a 48 KB PNG of 7000 × 7000 raised `prepare`'s peak memory from 0.85 to 1.48 GB; one of 12000 × 12000
# took it to 2.7 GB.
DECODE_BYTES_PER_PIXEL = 13
PIXEL_LIMIT_FACTOR = 32  # an image may be up to 32 × image_size on a side (its area, in pixels) …
MIN_PIXEL_LIMIT = 6000 * 6000  # … and at least 36 megapixels (a large camera photo), whatever image_size is


def pixel_limit(image_size: int, max_pixels: int | None = None) -> int:
    """The most pixels (width × height) an image of an image folder may have: ``max_pixels`` when given
    (params: ``data.max_pixels``), else (PIXEL_LIMIT_FACTOR × image_size)², at least MIN_PIXEL_LIMIT."""
    return max_pixels if max_pixels is not None else max(MIN_PIXEL_LIMIT, (PIXEL_LIMIT_FACTOR * image_size) ** 2)
