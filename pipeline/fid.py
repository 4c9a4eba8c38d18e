"""Stage `fid`: FID, KID and Inception Score of one sample cell against the held-out
test split, through torch-fidelity."""

from pathlib import Path

import torch

from ddpm.data import DataError, load_split
from ddpm.metrics import compute_metrics
from pipeline.common import resolve_device, write_json
from pipeline.params import for_stage, load_params


def load_samples(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"samples file {path} does not exist (run the sample stage first)")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        images = d["images"]
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"samples file {path} is corrupt: {first}") from e
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4):
        raise DataError(f"samples file {path}: images must be a uint8 tensor [N, C, H, W]")
    return d


def main(params_path: Path, samples: Path, reference: Path, classifier: Path, out: Path, device: str) -> None:
    f = for_stage(load_params(params_path), "fid").fid
    s = load_samples(samples)
    ref = load_split(reference).images
    if s["images"].shape[1:] != ref.shape[1:]:
        raise DataError(f"samples in {samples} have shape {list(s['images'].shape[1:])}, "
                        f"the reference {reference} {list(ref.shape[1:])}")
    dev = resolve_device(device)
    weights = classifier if f.extractor == "ddpm-classifier" else f.weights_path
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"feature extractor weights {weights} do not exist")
    m = compute_metrics(s["images"], ref, extractor=f.extractor, weights_path=weights, cuda=dev.type == "cuda",
                        batch_size=f.batch_size, kid_subset_size=f.kid_subset_size)
    write_json(out, {"sampler": s["sampler"], "steps": s["steps"], "num_samples": s["images"].shape[0],
                     "extractor": f.extractor, **{k: round(v, 6) for k, v in m.items()}})
    print(f"fid {s['sampler']}-{s['steps']}: FID {m['fid']:.3f}, KID {m['kid_mean']:.5f} → {out}")
