"""Stage `fid_ref`: features and statistics of the reference set (the held-out test
split), computed once per (dataset, split, extractor, resolution) and kept as a DVC
output that every `fid` cell reads.

DVC re-runs the stage when the prepared split, the extractor weights or the declared
``fid.*`` params change. The file also records what it was made from (``key``), and
the `fid` stage refuses a reference whose key does not match its own inputs, so a
reference can never go stale silently (torch-fidelity's on-disk cache is not used).

The real-data floor, which scores real images against these statistics, is stage
`fid_floor`: sampling params re-run it, never this stage.
"""

from pathlib import Path

from ddpm.data import load_split
from ddpm.files import atomic_save
from ddpm.metrics import extract_features, reference_statistics
from pipeline.common import check_writable, progress, resolve_device, write_json
from pipeline.params import for_stage, load_params
from pipeline.reference import FORMAT, extractor_weights, reference_key


def main(params_path: Path, reference: Path, classifier: Path, out: Path, device: str) -> None:
    f = for_stage(load_params(params_path), "fid_ref").fid
    check_writable(out / "stats.pt", out / "info.json")
    split = load_split(reference)
    weights = extractor_weights(f.extractor, f.weights_path, classifier)
    dev = resolve_device(device)
    images = split.images
    with progress(images.shape[0], f"fid_ref {f.extractor}") as bar:
        feats = extract_features(images, extractor=f.extractor, weights_path=weights, cuda=dev.type == "cuda",
                                 batch_size=f.batch_size, progress=bar)
    stats = reference_statistics(feats, device=dev)
    key = reference_key(images, reference.stem, f.extractor, weights)
    atomic_save({"format": FORMAT, "key": key, "num_images": images.shape[0], **stats}, out / "stats.pt")
    write_json(out / "info.json", {**key, "num_images": images.shape[0], "source": str(reference),
                                   "feature_dim": stats["features"].shape[1]})
    print(f"fid_ref: {f.extractor} statistics of {images.shape[0]} images of {reference} → {out}")
