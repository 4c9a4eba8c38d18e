"""Stage `prepare`: read the data set and write the train/test splits as uint8 tensors."""

from pathlib import Path

from ddpm.data import load_cifar10, load_image_folder, load_mnist_like, resize_split, save_split
from pipeline.common import check_writable, repo_root, write_json
from pipeline.params import for_stage, load_params


def main(params_path: Path, out_dir: Path) -> None:
    d = for_stage(load_params(params_path), "prepare").data
    check_writable(out_dir / "train.pt", out_dir / "test.pt", out_dir / "info.json")
    cache = repo_root() / "data" / "raw"
    if d.name in ("fashion_mnist", "mnist"):
        splits = load_mnist_like(d.name, d.root, cache, d.download)
    elif d.name == "cifar10":
        splits = load_cifar10(d.root, cache, d.download)
    else:
        splits = load_image_folder(d.root, d.image_size, d.channels, d.test_fraction, seed=0)
    info = {"dataset": d.name}
    for name, split in splits.items():
        split = resize_split(split, d.image_size)
        save_split(split, out_dir / f"{name}.pt")
        info[name] = {"num_images": split.images.shape[0], "shape": list(split.images.shape[1:])}
    info["classes"] = splits["train"].classes
    write_json(out_dir / "info.json", info)
    print(f"prepared {d.name}: {info['train']['num_images']} train, {info['test']['num_images']} test images "
          f"of shape {info['train']['shape']} → {out_dir}")
