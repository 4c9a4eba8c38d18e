"""Stage `classifier`: train the feature-extractor classifier for offline FID and report its test
accuracy (``metrics/classifier.json``: ``classifier.test_accuracy``, ``classifier.final_loss``).

With a pinned ruler (``fid.ruler``, ``python -m pipeline ruler pin``) that holds a classifier, the
stage trains nothing: it copies the pinned checkpoint and metrics, byte for byte, so that every
FID is measured with the pinned weights whatever the code or params of this stage now are."""

import time
from dataclasses import asdict
from pathlib import Path

import typer

from ddpm.ruler import PINNED_FILES, read_pinned
from pipeline.outputs import check_writable, write_atomic, write_json, write_metrics
from pipeline.params import base, classifier, fid
from pipeline.stages._cli import DEVICE, PARAMS, stage, stage_app

KEYS = ["classifier", "fid.ruler"]

app = stage_app()


def train(c, data: Path, out: Path, device: str) -> dict:
    """Train the classifier of the params ``c`` on the prepared split in ``data`` and save it to ``out``;
    its metrics."""
    import torch

    from ddpm.checkpoint import save_checkpoint
    from ddpm.classifier import Classifier, accuracy, train_classifier
    from ddpm.data import load_split
    from pipeline.device import resolve_device
    from pipeline.progress import progress

    train, test = load_split(data / "train.pt"), load_split(data / "test.pt")
    dev = resolve_device(device)
    torch.manual_seed(c.seed)
    model = Classifier(c.arch, in_channels=train.images.shape[1], num_classes=len(train.classes))
    with progress(c.steps, "classifier") as bar:
        losses = train_classifier(model, train.images, train.labels, steps=c.steps, batch_size=c.batch_size,
                                  lr=c.lr, seed=c.seed, device=dev, progress=bar)
    acc = accuracy(model, test.images, test.labels, dev)
    config = {"classifier": {"arch": asdict(c.arch), "in_channels": train.images.shape[1],
                             "num_classes": len(train.classes)}, "classes": train.classes}
    save_checkpoint(out, step=c.steps, config=config, model={k: v.cpu() for k, v in model.state_dict().items()})
    return {"classifier": {"test_accuracy": round(acc, 6), "final_loss": round(losses[-1][1], 6)}}


@app.command()
@stage
def main(params: Path = PARAMS, data: Path = typer.Option(Path("data/prepared"), help="prepared data folder"),
         out: Path = typer.Option(Path("models/classifier.pt"), help="the classifier checkpoint (the FID's extractor)"),
         metrics: Path = typer.Option(Path("metrics/classifier.json"), help="its test accuracy and final loss"),
         device: str = DEVICE,
         timing: Path = typer.Option(Path("logs/classifier_timing.json"), help="when it ran (for MLflow)")):
    """Train the feature-extractor classifier used for offline FID (classifier.*), or copy a pinned ruler's."""
    started_ms = int(time.time() * 1000)
    p = base.load(params, "classifier", KEYS, classifier, fid)
    check_writable(out, metrics, timing)
    start = time.perf_counter()
    pinned = read_pinned(Path(p.fid.ruler)) if p.fid.ruler is not None else None
    if pinned is not None and "weights" in pinned["files"]:
        folder = Path(p.fid.ruler)
        write_atomic(out, (folder / PINNED_FILES["weights"]).read_bytes())
        write_atomic(metrics, (folder / PINNED_FILES["classifier_metrics"]).read_bytes())
        print(f"classifier: the pinned ruler {pinned['ruler']['id']}'s classifier ({folder}) → {out}")
    else:
        result = train(p.classifier, data, out, device)
        write_metrics(metrics, result)
        print(f"classifier: test accuracy {result['classifier']['test_accuracy']:.4f} after {p.classifier.steps} "
              f"steps ({time.perf_counter() - start:.0f} s) → {out}")
    write_json(timing, {"started_ms": started_ms, "ended_ms": int(time.time() * 1000),
                        "seconds": round(time.perf_counter() - start, 2)})


if __name__ == "__main__":
    app()
