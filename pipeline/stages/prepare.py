"""Stage `prepare`: read the data set and write the train/test splits as uint8 tensors."""

from pathlib import Path

import typer

from ddpm.data import save_split
from ddpm.datasets import load_cifar10, load_image_folder, load_mnist_like, resize_split
from pipeline.outputs import check_writable, write_json
from pipeline.params import base, data
from pipeline.stages._cli import PARAMS, stage, stage_app
from pipeline.workspace import repo_root

KEYS = ["data"]

app = stage_app()


@app.command()
@stage
def main(params: Path = PARAMS,
         out: Path = typer.Option(Path("data/prepared"), help="folder for train.pt, test.pt, info.json")):
    """Read the data set (data.*) and write its train/test splits."""
    d = base.load(params, "prepare", KEYS, data).data
    check_writable(out / "train.pt", out / "test.pt", out / "info.json")
    cache = repo_root() / "data" / "raw"
    if d.name in ("fashion_mnist", "mnist"):
        splits = load_mnist_like(d.name, d.root, cache, d.download)
    elif d.name == "cifar10":
        splits = load_cifar10(d.root, cache, d.download)
    else:
        splits = load_image_folder(d.root, d.image_size, d.channels, d.test_fraction, seed=0, max_pixels=d.max_pixels)
    info = {"dataset": d.name}
    for name, split in splits.items():
        split = resize_split(split, d.image_size)
        split.dataset = d.name
        save_split(split, out / f"{name}.pt")
        info[name] = {"num_images": split.images.shape[0], "shape": list(split.images.shape[1:])}
    info["classes"] = splits["train"].classes
    write_json(out / "info.json", info)
    print(f"prepared {d.name}: {info['train']['num_images']} train, {info['test']['num_images']} test images "
          f"of shape {info['train']['shape']} → {out}")


if __name__ == "__main__":
    app()
