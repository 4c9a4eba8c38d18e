"""Stage `fid_floor`: the real-data floor (``metrics/fid_floor.json``: ``floor.fid``,
``floor.precision``, ``floor.recall``, …), the metrics of ``sample.num_samples`` real training
images, drawn with ``sample.seed``, against the reference statistics of stage `fid_ref`, with
the same extractor and metrics as every `fid` cell. FIDs from different extractors or numbers of
samples are not comparable; the floor gives each cell's FID its scale (what a perfect model would
score with that many samples: FID is biased upwards at small sample sizes). ``floor.ruler`` names
the ruler it was measured with (``ddpm.ruler``).

A stage of its own: a new ``sample.num_samples`` or ``sample.seed`` re-runs it, never
`fid_ref`, whose statistics depend only on the data and the extractor.
"""

from pathlib import Path

import torch
import typer

from ddpm.data import load_split
from ddpm.metrics import score
from ddpm.ruler import load_reference, of_files, weights_file
from pipeline.device import resolve_device
from pipeline.outputs import check_writable, write_metrics
from pipeline.params import base, fid, sample
from pipeline.progress import progress
from pipeline.stages._cli import DEVICE, PARAMS, stage, stage_app

KEYS = ["fid.extractor", "fid.weights_path", "fid.batch_size", "fid.kid_subset_size", "sample.num_samples",
        "sample.seed"]

app = stage_app()


def real_subset(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` images drawn without replacement from ``images`` with ``seed`` (all of them when fewer)."""
    g = torch.Generator().manual_seed(seed)
    return images[torch.randperm(images.shape[0], generator=g)[:n]]


@app.command()
@stage
def main(params: Path = PARAMS,
         real: Path = typer.Option(Path("data/prepared/train.pt"), help="real images (a prepared split)"),
         reference: Path = typer.Option(Path("data/reference/stats.pt"), help="reference statistics (fid-ref)"),
         classifier: Path = typer.Option(Path("models/classifier.pt"), help="weights of the ddpm-classifier extractor"),
         out: Path = typer.Option(Path("metrics/fid_floor.json"), help="the floor's metrics"),
         device: str = DEVICE):
    """The real-data floor: sample.num_samples real images (drawn with sample.seed) against the reference (fid.*)."""
    p = base.load(params, "fid_floor", KEYS, fid, sample)
    f = p.fid
    check_writable(out)
    images = real_subset(load_split(real).images, p.sample.num_samples, p.sample.seed)
    ref = load_reference(reference)
    weights = weights_file(f.extractor, f.weights_path, classifier)
    with progress(images.shape[0], f"fid_floor {f.extractor}") as bar:
        m = score(images, ref, reference, extractor=f.extractor, weights=weights, batch_size=f.batch_size,
                  kid_subset_size=f.kid_subset_size, device=resolve_device(device), progress=bar, label="real")
    first = ("fid", "precision", "recall")
    write_metrics(out, {"floor": {**{k: round(m[k], 6) for k in first},
                                  **{k: round(v, 6) for k, v in m.items() if k not in first},
                                  "num_images": images.shape[0], "reference_images": ref["num_images"],
                                  "extractor": f.extractor,
                                  "ruler": of_files(f.extractor, weights, reference)["id"]}})
    print(f"fid_floor: {images.shape[0]} real images of {real}: FID {m['fid']:.3f}, "
          f"precision {m['precision']:.3f}, recall {m['recall']:.3f} → {out}")


if __name__ == "__main__":
    app()
