"""Stage `classifier`: train the feature-extractor classifier for offline FID and
report its test accuracy (``metrics/classifier.json``: ``classifier.test_accuracy``,
``classifier.final_loss``)."""

import time
from dataclasses import asdict
from pathlib import Path

import torch

from ddpm.checkpoint import save_checkpoint
from ddpm.classifier import Classifier, accuracy, train_classifier
from ddpm.data import load_split
from pipeline.common import check_writable, progress, resolve_device, write_json, write_metrics
from pipeline.params import for_stage, load_params


def main(params_path: Path, data_dir: Path, out: Path, metrics: Path, device: str,
         timing: Path = Path("logs/classifier_timing.json")) -> None:
    started_ms = int(time.time() * 1000)
    c = for_stage(load_params(params_path), "classifier").classifier
    check_writable(out, metrics, timing)
    train, test = load_split(data_dir / "train.pt"), load_split(data_dir / "test.pt")
    dev = resolve_device(device)
    torch.manual_seed(c.seed)
    model = Classifier(c.arch, in_channels=train.images.shape[1], num_classes=len(train.classes))
    start = time.perf_counter()
    with progress(c.steps, "classifier") as bar:
        losses = train_classifier(model, train.images, train.labels, steps=c.steps, batch_size=c.batch_size,
                                  lr=c.lr, seed=c.seed, device=dev, progress=bar)
    acc = accuracy(model, test.images, test.labels, dev)
    config = {"classifier": {"arch": asdict(c.arch), "in_channels": train.images.shape[1],
                             "num_classes": len(train.classes)}, "classes": train.classes}
    save_checkpoint(out, step=c.steps, config=config, model={k: v.cpu() for k, v in model.state_dict().items()})
    write_metrics(metrics, {"classifier": {"test_accuracy": round(acc, 6), "final_loss": round(losses[-1][1], 6)}})
    write_json(timing, {"started_ms": started_ms, "ended_ms": int(time.time() * 1000),
                        "seconds": round(time.perf_counter() - start, 2)})
    print(f"classifier: test accuracy {acc:.4f} after {c.steps} steps ({time.perf_counter() - start:.0f} s) → {out}")
