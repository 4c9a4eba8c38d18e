"""Stage `fid_floor`: the real-data floor (``metrics/fid_floor.json``), the metrics of
``sample.num_samples`` real training images, drawn with ``sample.seed``, against the
reference statistics of stage `fid_ref`, with the same extractor and metrics as every
`fid` cell. FIDs from different extractors or numbers of samples are not comparable; the
floor gives each cell's FID its scale (what a perfect model would score with that many
samples: FID is biased upwards at small sample sizes).

A stage of its own: a new ``sample.num_samples`` or ``sample.seed`` re-runs it, never
`fid_ref`, whose statistics depend only on the data and the extractor.
"""

from pathlib import Path

import torch

from ddpm.data import load_split
from ddpm.metrics import extract_features, metrics_from_features
from pipeline.common import check_writable, progress, resolve_device, write_json
from pipeline.params import for_stage, load_params
from pipeline.reference import check_reference, extractor_weights, load_reference


def real_subset(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` images drawn without replacement from ``images`` with ``seed`` (all of them when fewer)."""
    g = torch.Generator().manual_seed(seed)
    return images[torch.randperm(images.shape[0], generator=g)[:n]]


def main(params_path: Path, real: Path, reference: Path, classifier: Path, out: Path, device: str) -> None:
    p = for_stage(load_params(params_path), "fid_floor")
    f = p.fid
    check_writable(out)
    images = real_subset(load_split(real).images, p.sample.num_samples, p.sample.seed)
    ref = load_reference(reference)
    weights = extractor_weights(f.extractor, f.weights_path, classifier)
    check_reference(ref, reference, images, f.extractor, weights)
    dev = resolve_device(device)
    with progress(images.shape[0], f"fid_floor {f.extractor}") as bar:
        feats = extract_features(images, extractor=f.extractor, weights_path=weights, cuda=dev.type == "cuda",
                                 batch_size=f.batch_size, progress=bar)
    m = metrics_from_features(feats, ref, kid_subset_size=f.kid_subset_size)
    write_json(out, {"source": str(real), "num_images": images.shape[0], "reference_images": ref["num_images"],
                     "extractor": f.extractor, **{k: round(v, 6) for k, v in m.items()}})
    print(f"fid_floor: {images.shape[0]} real images of {real}: FID {m['fid']:.3f}, "
          f"precision {m['precision']:.3f}, recall {m['recall']:.3f} → {out}")
