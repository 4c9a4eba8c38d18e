"""Stage `fid_floor`: the real-data floor (``metrics/fid_floor.json``: ``floor.fid``,
``floor.precision``, ``floor.recall``, …), the metrics of
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
from pipeline.common import check_writable, resolve_device, write_metrics
from pipeline.params import for_stage, load_params
from pipeline.reference import load_reference, score


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
    m = score(images, ref, reference, f, classifier, resolve_device(device), f"fid_floor {f.extractor}")
    first = ("fid", "precision", "recall")
    write_metrics(out, {"floor": {**{k: round(m[k], 6) for k in first}, **{k: round(v, 6) for k, v in m.items()
                                                                          if k not in first},
                                  "num_images": images.shape[0], "reference_images": ref["num_images"],
                                  "extractor": f.extractor}})
    print(f"fid_floor: {images.shape[0]} real images of {real}: FID {m['fid']:.3f}, "
          f"precision {m['precision']:.3f}, recall {m['recall']:.3f} → {out}")
