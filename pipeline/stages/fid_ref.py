"""Stage `fid_ref`: features and statistics of the reference set (the held-out test split),
computed once per (dataset, split, extractor, resolution) and kept as a DVC output that every
`fid` cell reads.

DVC re-runs the stage when the prepared split, the extractor weights or the declared
``fid.*`` params change. The file also records what it was made from (``key``), and the `fid`
stage refuses a reference whose key does not match its own inputs, so a reference can never go
stale silently (torch-fidelity's on-disk cache is not used). With a pinned ruler (``fid.ruler``)
the stage computes nothing: it checks that the pinned statistics were made from this split with
this extractor and weights, and copies them byte for byte.

The real-data floor, which scores real images against these statistics, is stage `fid_floor`:
sampling params re-run it, never this stage.
"""

from pathlib import Path

import typer

from ddpm.data import DataError, load_split
from ddpm.files import atomic_save
from ddpm.ruler import FORMAT, PINNED_FILES, read_pinned, reference_key, weights_file
from pipeline.outputs import check_writable, read_json, write_atomic, write_json
from pipeline.params import base, fid
from pipeline.stages._cli import DEVICE, PARAMS, stage, stage_app

KEYS = ["fid.extractor", "fid.weights_path", "fid.batch_size", "fid.ruler"]

app = stage_app()


def compute(images, split: str, f, weights, device: str) -> tuple[dict, dict]:
    """(the statistics file's content, its key) of ``images`` with the extractor of the params ``f``."""
    from ddpm.metrics import extract_features, reference_statistics
    from pipeline.device import resolve_device
    from pipeline.progress import progress

    dev = resolve_device(device)
    with progress(images.shape[0], f"fid_ref {f.extractor}") as bar:
        feats = extract_features(images, extractor=f.extractor, weights_path=weights, cuda=dev.type == "cuda",
                                 batch_size=f.batch_size, progress=bar)
    stats = reference_statistics(feats, device=dev)
    weights = weights or weights_file(f.extractor, f.weights_path, None)  # Inception's, downloaded just now
    key = reference_key(images, split, f.extractor, weights)
    return {"format": FORMAT, "key": key, "num_images": images.shape[0], **stats}, key


def copy_pinned(folder: Path, images, weights, extractor: str, out: Path) -> dict:
    """Copy a pinned ruler's statistics to ``out`` once they are checked to be of these images, this
    extractor and these weights; their info.json."""
    read_pinned(folder)
    info = read_json(folder / PINNED_FILES["reference_info"])
    expected = reference_key(images, info.get("split"), extractor, weights)
    differ = [k for k, v in expected.items() if info.get(k) != v]
    if differ:
        raise DataError(f"the pinned ruler {folder} was made for another {', '.join(differ)} than this pipeline's "
                        f"({', '.join(f'{k}={info.get(k)}' for k in differ)}): pin a ruler of these data, or set "
                        "fid.ruler: null")
    write_atomic(out / "stats.pt", (folder / PINNED_FILES["reference"]).read_bytes())
    return info


@app.command()
@stage
def main(params: Path = PARAMS,
         reference: Path = typer.Option(Path("data/prepared/test.pt"), help="reference split"),
         classifier: Path = typer.Option(Path("models/classifier.pt"), help="weights of the ddpm-classifier extractor"),
         out: Path = typer.Option(Path("data/reference"), help="folder for stats.pt and info.json"),
         device: str = DEVICE):
    """Features and mean/covariance of the reference split, once per extractor (fid.extractor, ...)."""
    f = base.load(params, "fid_ref", KEYS, fid).fid
    check_writable(out / "stats.pt", out / "info.json")
    images = load_split(reference).images
    weights = weights_file(f.extractor, f.weights_path, classifier)
    if f.ruler is not None:
        info = copy_pinned(Path(f.ruler), images, weights, f.extractor, out)
        print(f"fid_ref: the pinned ruler's statistics ({f.ruler}) → {out}")
    else:
        content, key = compute(images, reference.stem, f, weights, device)
        atomic_save(content, out / "stats.pt")
        info = {**key, "num_images": images.shape[0], "source": str(reference),
                "feature_dim": content["features"].shape[1]}
        print(f"fid_ref: {f.extractor} statistics of {images.shape[0]} images of {reference} → {out}")
    write_json(out / "info.json", {**info, "source": str(reference)})


if __name__ == "__main__":
    app()
