"""Stage `fid`: FID, KID, precision/recall and Inception Score of one sample cell
against the reference statistics of the held-out test split (stage `fid_ref`),
through torch-fidelity. For the samples of a class-conditional model also the class
accuracy: the share that the pipeline's own classifier (stage `classifier`) assigns to
the class they were drawn for (the idea of the Classification Accuracy Score, Ravuri &
Vinyals 2019)."""

from pathlib import Path

import torch

from ddpm.checkpoint import load_checkpoint
from ddpm.files import load_torch_file
from ddpm.classifier import accuracy
from ddpm.data import DataError
from ddpm.metrics import load_classifier
from pipeline.common import check_writable, resolve_device, write_json
from pipeline.params import for_stage, load_params
from pipeline.reference import load_reference, score


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


def main(params_path: Path, samples: Path, reference: Path, classifier: Path, out: Path, device: str) -> None:
    f = for_stage(load_params(params_path), "fid").fid
    check_writable(out)
    s = load_samples(samples)
    ref = load_reference(reference)
    if list(s["images"].shape[1:]) != ref["key"]["resolution"]:
        raise DataError(f"samples in {samples} have shape {list(s['images'].shape[1:])}, "
                        f"the reference {reference} {ref['key']['resolution']}")
    dev = resolve_device(device)
    images = s["images"]
    cell = f"{s['sampler']}-{s['steps']}" + (f"-{s['guidance']}" if s.get("guidance") else "")
    m = score(images, ref, reference, f, classifier, dev, f"fid {cell}")
    guided = {}
    if s.get("labels") is not None:  # a class-conditional model's samples
        guided = {"guidance": s.get("guidance"), "w": float(s.get("w", 0.0)), "classes": list(s["classes"]),
                  "class_accuracy": round(class_accuracy(s, classifier, dev), 6)}
    write_json(out, {"sampler": s["sampler"], "steps": s["steps"], "num_samples": images.shape[0],
                     "reference_images": ref["num_images"], "extractor": f.extractor, **guided,
                     **{k: round(v, 6) for k, v in m.items()}})
    print(f"fid {cell}: FID {m['fid']:.3f}, KID {m['kid_mean']:.5f}, "
          f"precision {m['precision']:.3f}, recall {m['recall']:.3f}"
          + (f", class accuracy {guided['class_accuracy']:.3f}" if guided else "") + f" → {out}")
