"""Stage `fid`: FID, KID, precision/recall and Inception Score of one sample cell
against the reference statistics of the held-out test split (stage `fid_ref`),
through torch-fidelity. For the samples of a class-conditional model also the class
accuracy: the share that the pipeline's own classifier (stage `classifier`) assigns to
the class they were drawn for (the idea of the Classification Accuracy Score, Ravuri &
Vinyals 2019). The cell records the ruler it was measured with (``ruler``: ``ddpm.ruler``), so
that FIDs measured with different rulers are never compared unawares."""

from pathlib import Path

import torch
import typer

from ddpm.checkpoint import load_checkpoint
from ddpm.classifier import accuracy
from ddpm.data import DataError
from ddpm.files import load_torch_file
from ddpm.metrics import load_classifier, score
from ddpm.ruler import load_reference, of_files, weights_file
from pipeline.device import resolve_device
from pipeline.outputs import check_writable, write_json
from pipeline.params import base, fid
from pipeline.progress import progress
from pipeline.stages._cli import DEVICE, PARAMS, stage, stage_app

KEYS = ["fid.extractor", "fid.weights_path", "fid.batch_size", "fid.kid_subset_size"]
STAGE_KEYS = {"fid": KEYS, "fid_guided": KEYS}  # dvc.yaml's two stages

app = stage_app()


def load_samples(path: Path) -> dict:
    d = load_torch_file(path, DataError, f"samples file {path} does not exist (run the sample stage first)",
                        f"samples file {path} is corrupt")
    missing = [k for k in ("images", "sampler", "steps") if not isinstance(d, dict) or k not in d]
    if missing:
        raise DataError(f"samples file {path} lacks {', '.join(missing)} (rerun its sample stage)")
    images = d["images"]
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4):
        raise DataError(f"samples file {path}: images must be a uint8 tensor [N, C, H, W]")
    labels = d.get("labels")
    if labels is not None and not (isinstance(labels, torch.Tensor) and labels.shape == (images.shape[0],)
                                   and isinstance(d.get("classes"), list)):
        raise DataError(f"samples file {path}: labels must be a tensor [N] matching the images, with class names")
    return d


def class_accuracy(samples: dict, classifier: Path, device) -> float:
    """Share of the samples that the classifier in ``classifier`` assigns to the class they were drawn for."""
    trained_on = load_checkpoint(classifier)["config"].get("classes")
    if trained_on is not None and list(trained_on) != list(samples["classes"]):
        raise DataError(f"the classifier {classifier} knows the classes {trained_on}, the samples' model "
                        f"{samples['classes']}: train both on the same data")
    return accuracy(load_classifier(classifier), samples["images"], samples["labels"].long().cpu(), device)


@app.command()
@stage
def main(params: Path = PARAMS, samples: Path = typer.Option(..., help="samples.pt of one cell"),
         reference: Path = typer.Option(Path("data/reference/stats.pt"), help="reference statistics (fid-ref)"),
         classifier: Path = typer.Option(Path("models/classifier.pt"), help="weights of the ddpm-classifier extractor"),
         out: Path = typer.Option(..., help="metrics JSON of the cell"), device: str = DEVICE):
    """FID, KID, precision/recall and Inception Score of one cell against the reference (fid.*)."""
    f = base.load(params, "fid", KEYS, fid).fid
    check_writable(out)
    s = load_samples(samples)
    ref = load_reference(reference)
    if list(s["images"].shape[1:]) != ref["key"]["resolution"]:
        raise DataError(f"samples in {samples} have shape {list(s['images'].shape[1:])}, "
                        f"the reference {reference} {ref['key']['resolution']}")
    dev = resolve_device(device)
    images = s["images"]
    cell = f"{s['sampler']}-{s['steps']}" + (f"-{s['guidance']}" if s.get("guidance") else "")
    weights = weights_file(f.extractor, f.weights_path, classifier)
    with progress(images.shape[0], f"fid {cell}") as bar:
        m = score(images, ref, reference, extractor=f.extractor, weights=weights, batch_size=f.batch_size,
                  kid_subset_size=f.kid_subset_size, device=dev, progress=bar)
    guided = {}
    if s.get("labels") is not None:  # a class-conditional model's samples
        guided = {"guidance": s.get("guidance"), "w": float(s.get("w", 0.0)), "classes": list(s["classes"]),
                  "class_accuracy": round(class_accuracy(s, classifier, dev), 6)}
    write_json(out, {"sampler": s["sampler"], "steps": s["steps"], "num_samples": images.shape[0],
                     "reference_images": ref["num_images"], "extractor": f.extractor,
                     "ruler": of_files(f.extractor, weights, reference), **guided,
                     **{k: round(v, 6) for k, v in m.items()}})
    print(f"fid {cell}: FID {m['fid']:.3f}, KID {m['kid_mean']:.5f}, "
          f"precision {m['precision']:.3f}, recall {m['recall']:.3f}"
          + (f", class accuracy {guided['class_accuracy']:.3f}" if guided else "") + f" → {out}")


if __name__ == "__main__":
    app()
