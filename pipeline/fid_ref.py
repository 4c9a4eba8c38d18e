"""Stage `fid_ref`: features and statistics of the reference set (the held-out test
split), computed once per (dataset, split, extractor, resolution) and kept as a DVC
output that every `fid` cell reads.

DVC re-runs the stage when the prepared split, the extractor weights or the declared
``fid.*`` params change. The file also records what it was made from (``key``), and
the `fid` stage refuses a reference whose key does not match its own inputs, so a
reference can never go stale silently (torch-fidelity's on-disk cache is not used).

It also measures the real-data floor (``metrics/fid_floor.json``): the metrics of
``sample.num_samples`` real training images, drawn with ``sample.seed``, against the
same reference. FIDs from different extractors are not comparable; the floor gives
each cell's FID its scale (what a perfect model would score with that many samples).
"""

from pathlib import Path

import torch

from ddpm.data import load_split
from ddpm.files import atomic_save
from ddpm.metrics import create_extractor, extract_features, metrics_from_features, reference_statistics
from pipeline.common import check_writable, progress, resolve_device, write_json
from pipeline.params import for_stage, load_params
from pipeline.reference import FORMAT, extractor_weights, reference_key


def real_subset(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` images drawn without replacement from ``images`` with ``seed`` (all of them when fewer)."""
    g = torch.Generator().manual_seed(seed)
    return images[torch.randperm(images.shape[0], generator=g)[:n]]


def main(params_path: Path, reference: Path, classifier: Path, out: Path, device: str,
         floor_from: Path | None = None, floor_out: Path | None = None) -> None:
    p = for_stage(load_params(params_path), "fid_ref")
    f = p.fid
    check_writable(out / "stats.pt", out / "info.json", *([floor_out] if floor_out else []))
    split = load_split(reference)
    floor_images = None if floor_from is None or floor_out is None else real_subset(
        load_split(floor_from).images, p.sample.num_samples, p.sample.seed)
    weights = extractor_weights(f.extractor, f.weights_path, classifier)
    dev = resolve_device(device)
    model = create_extractor(f.extractor, weights, dev.type == "cuda")  # loaded once, for both sets
    images = split.images
    with progress(images.shape[0], f"fid_ref {f.extractor}") as bar:
        feats = extract_features(images, extractor=f.extractor, batch_size=f.batch_size, progress=bar, model=model)
    stats = reference_statistics(feats)
    key = reference_key(images, reference.stem, f.extractor, weights)
    atomic_save({"format": FORMAT, "key": key, "num_images": images.shape[0], **stats}, out / "stats.pt")
    write_json(out / "info.json", {**key, "num_images": images.shape[0], "source": str(reference),
                                   "feature_dim": stats["features"].shape[1]})
    print(f"fid_ref: {f.extractor} statistics of {images.shape[0]} images of {reference} → {out}")
    if floor_images is not None:
        real = extract_features(floor_images, extractor=f.extractor, batch_size=f.batch_size, model=model)
        m = metrics_from_features(real, stats, kid_subset_size=f.kid_subset_size)
        write_json(floor_out, {"source": str(floor_from), "num_images": floor_images.shape[0],
                               "reference_images": images.shape[0], "extractor": f.extractor,
                               **{k: round(v, 6) for k, v in m.items()}})
        print(f"fid_ref: real-data floor, {floor_images.shape[0]} images of {floor_from}: FID {m['fid']:.3f}, "
              f"precision {m['precision']:.3f}, recall {m['recall']:.3f} → {floor_out}")
