"""Reliability, round two (issue 22): a crafted data file runs no code, staging never hides new
data, a full disk is one line, the ema stage checks its checkpoint, a sample cell is one unit,
and the validation gaps (a boolean for a number, attention at no resolution of the network, an
empty params file, a bad IDX magic number). Each test failed before its fix. The `dvc exp run`
matrix case is in tests/test_exp_run.py."""

import errno
import os
import pickle
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import make_idx_dir, synthetic_images, write_idx
from test_data import write_cifar
from tiny import cli, errors, python, subprocess_env, workspace

import ddpm.files
from ddpm.data import DataError
from ddpm.datasets import load_cifar10, load_mnist_like
from pipeline.params.base import ParamsError
from pipeline.params.schema import parse_params

pytestmark = pytest.mark.usefixtures("one_thread")

SENTINEL = b"produced by an earlier run"


def fails(root, args, *, naming: str, keeps=()):
    """Run a command that must fail: exactly one stderr line, ``error: …`` naming ``naming``; the
    files ``keeps`` (relative to ``root``) hold what an earlier run left."""
    for f in keeps:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(SENTINEL)
    result = cli(root, *args)
    assert result.exit_code == 1, (result.output, result.exception)
    lines = errors(result)
    assert len(lines) == 1 and result.stderr.strip().splitlines()[-1] == lines[0], result.stderr
    assert naming in lines[0], lines[0]
    for f in keeps:
        assert (root / f).read_bytes() == SENTINEL, f"{f} was overwritten"
    return lines[0]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def set_params(root: Path, change) -> None:
    p = yaml.safe_load((root / "params.yaml").read_text())
    change(p)
    (root / "params.yaml").write_text(yaml.safe_dump(p))


# --------------------------------------------------------------------------- 1. no code from a data file
class RunsCode:
    """Unpickling this calls os.system: what a crafted CIFAR-10 batch can hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def craft_cifar(root: Path, marker: Path) -> Path:
    base = write_cifar(root)
    batch = {"data": RunsCode(f"touch {marker}"), "labels": [0, 1, 2, 3]}
    (base / "data_batch_1").write_bytes(pickle.dumps(batch))
    return base


def test_a_crafted_cifar10_batch_runs_no_code(tmp_path):
    marker = tmp_path / "code-ran"
    craft_cifar(tmp_path / "data", marker)
    with pytest.raises(DataError, match=r"refusing to read .*data_batch_1: not a CIFAR-10 python batch "
                                        r"\(it asks for posix\.system"):
        load_cifar10(tmp_path / "data", tmp_path / "cache")
    assert not marker.exists(), "unpickling the batch ran its code"


def test_a_crafted_cifar10_batch_fails_check_and_prepare_in_one_line(tmp_path):
    marker = tmp_path / "code-ran"
    craft_cifar(tmp_path / "data", marker)
    root = workspace(tmp_path / "ws")
    set_params(root, lambda p: p["data"].update(name="cifar10", root=str(tmp_path / "data"), image_size=8,
                                                 download=False))
    (root / "dvc.yaml").write_text("stages: {}\n")
    for args in (("check", "--out", "logs/check.json"), ("prepare", "--out", "out")):
        line = fails(root, args, naming="data_batch_1", keeps=["out/train.pt", "logs/check.json"])
        assert "posix.system" in line
    assert not marker.exists(), "the batch's code ran"


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_repacked_cifar10_batch_still_loads(tmp_path, protocol):
    """Not the published file (no MD5 match), but only the format's types: read by the restricted unpickler."""
    base = write_cifar(tmp_path)
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    labels = np.array([9, 0, 4])
    (base / "test_batch").write_bytes(pickle.dumps({"data": data, "labels": labels, "batch_label": b"re-packed",
                                                    "filenames": ["a.png", "b.png", "c.png"]}, protocol=protocol))
    test = load_cifar10(tmp_path, tmp_path / "cache")["test"]
    assert torch.equal(test.images, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    assert test.labels.tolist() == [9, 0, 4]


def test_a_cifar10_batch_of_the_wrong_shape_is_named(tmp_path):
    base = write_cifar(tmp_path)
    (base / "data_batch_3").write_bytes(pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}))
    with pytest.raises(DataError, match=r"data_batch_3: 'data' must be a uint8 array \[N, 3072\]"):
        load_cifar10(tmp_path, tmp_path / "cache")


# --------------------------------------------------------------------------- 3. staging follows the source
def idx_set(root: Path, seed: int, n: int = 16) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, s in (("train", seed), ("t10k", seed + 1)):
        images, labels = synthetic_images(n, s)
        write_idx(root / f"{split}-images-idx3-ubyte", images[:, 0], compress=True)
        write_idx(root / f"{split}-labels-idx1-ubyte", labels, compress=True)
    return root


def test_another_data_root_is_staged_afresh(tmp_path):
    a, b = idx_set(tmp_path / "a", seed=0), idx_set(tmp_path / "b", seed=10)
    cache = tmp_path / "cache"
    assert torch.equal(load_mnist_like("fashion_mnist", a, cache)["train"].images[:, 0], synthetic_images(16, 0)[0][:, 0])
    got = load_mnist_like("fashion_mnist", b, cache)["train"].images[:, 0]
    assert torch.equal(got, synthetic_images(16, 10)[0][:, 0]), "prepare read the data staged from another data.root"
    idx_set(a, seed=20)  # the same folder, other files
    got = load_mnist_like("fashion_mnist", a, cache)["train"].images[:, 0]
    assert torch.equal(got, synthetic_images(16, 20)[0][:, 0])


def test_a_failed_prepare_does_not_stick(tmp_path):
    root = workspace(tmp_path / "ws")
    src = idx_set(tmp_path / "src", seed=0)
    good = (src / "train-images-idx3-ubyte.gz").read_bytes()
    images = src / "train-images-idx3-ubyte.gz"
    os.remove(images)
    (src / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + bytes(20))  # 1-d: not an image file
    set_params(root, lambda p: p["data"].update(root=str(src), image_size=0))  # 28×28, as written
    fails(root, ("prepare", "--out", "out"), naming=f"{src / 'train-images-idx3-ubyte'} is not an IDX file")
    (src / "train-images-idx3-ubyte").unlink()
    images.write_bytes(good)  # fixed
    ok = cli(root, "prepare", "--out", "out")
    assert ok.exit_code == 0, ok.output
    assert torch.equal(torch.load(root / "out/train.pt", weights_only=True)["images"][:, 0],
                       synthetic_images(16, 0)[0][:, 0])


# --------------------------------------------------------------------------- 7d. a bad IDX file, named
@pytest.mark.parametrize("damage, says", [
    (lambda b: b"\x00\x00\x09\x03" + b[4:], "is not an IDX file of 3-d unsigned bytes: its magic number is "
                                            "0x00000903, expected 0x00000803"),
    (lambda b: b[: len(b) // 2], "the IDX header says 16 × 28 × 28 bytes of data, so the file should have 12560 "
                                 "bytes, it has 6280"),
])
def test_a_bad_idx_file_is_named_with_what_is_wrong(tmp_path, damage, says):
    root = workspace(tmp_path / "ws")
    (root / "dvc.yaml").write_text("stages: {}\n")
    src = make_idx_dir(tmp_path / "src", n_train=16, n_test=8, compress=False)
    bad = src / "train-images-idx3-ubyte"
    bad.write_bytes(damage(bad.read_bytes()))
    set_params(root, lambda p: p["data"].update(root=str(src)))
    for args in (("prepare", "--out", "out"), ("check", "--out", "logs/check.json")):
        line = fails(root, args, naming=str(bad), keeps=["out/train.pt", "logs/check.json"])
        assert says in line and "AssertionError" not in line, line


# --------------------------------------------------------------------------- 7. params
def numeric_fields():
    """(dotted key, current value) of every int, float or numeric-choice field of the params schema."""
    from test_params_schema import SCHEMA, fields

    from helpers import REPO

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, schema, current, _, _ in fields(SCHEMA, raw):
        numeric_choice = any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in schema.get("enum", []))
        if schema.get("type") in ("integer", "number") or numeric_choice:
            yield key, raw


def test_a_boolean_is_no_number_in_any_field(figure):
    from test_params_schema import with_value

    tried = []
    for key, raw in numeric_fields():
        for value in (True, False):
            with pytest.raises(ParamsError, match=rf"{key.replace('.', r'[.]')}: "):
                parse_params(with_value(raw, key, value), "params.yaml")
        tried.append(key)
    assert {"train.steps", "train.lr", "data.channels", "samplers.ddim.eta", "seed"} <= set(tried)
    figure(f"params: a boolean refused in each of {len(tried)} numeric fields")


def test_train_steps_true_is_one_clear_line(tmp_path):
    root = workspace(tmp_path)
    set_params(root, lambda p: p["train"].update(steps=True))
    line = fails(root, ("train", "--device", "cpu", "--out", "models/new.pt"), naming="train.steps",
                 keeps=["models/new.pt"])
    assert "a boolean is not a number (got True)" in line


def test_attention_at_no_resolution_of_the_network_is_refused(tmp_path):
    from ddpm.errors import InputError
    from ddpm.unet import UNet, UNetConfig

    with pytest.raises(InputError, match=r"attn_resolutions \[13\] names no resolution of the network: with image "
                                         r"size 28 and 3 levels \(ch_mult\) they are \[28, 14, 7\]"):
        UNet(UNetConfig(attn_resolutions=(13,)), image_size=28, in_channels=1, out_channels=1)
    root = workspace(tmp_path)  # 8×8 images, ch_mult [1, 2]: resolutions 8 and 4
    (root / "dvc.yaml").write_text("stages: {}\n")
    set_params(root, lambda p: p["model"].update(attn_resolutions=[4, 13]))
    for args in (("check", "--out", "logs/check.json"), ("train", "--device", "cpu", "--out", "models/new.pt")):
        fails(root, args, naming="attn_resolutions [13] names no resolution of the network: with image size 8 "
                                 "and 2 levels (ch_mult) they are [8, 4]", keeps=["models/new.pt", "logs/check.json"])


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "{}\n"])
def test_an_empty_params_file_is_refused(tmp_path, text):
    root = workspace(tmp_path)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text(text)
    for args in (("check", "--out", "logs/check.json"), ("train", "--device", "cpu", "--out", "models/new.pt")):
        fails(root, args, naming="params.yaml is empty", keeps=["models/new.pt", "logs/check.json"])


def test_an_image_folder_without_image_size_is_refused():
    from helpers import REPO

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(name="folder", image_size=0)
    with pytest.raises(ParamsError, match="an image folder has no native size; set data.image_size"):
        parse_params(raw)


# --------------------------------------------------------------------------- 5, 6: a trained tiny model
def test_ema_refuses_a_checkpoint_whose_config_does_not_match_its_weights(trained):
    ckpt = torch.load(trained / "models/model.pt", weights_only=True)
    ckpt["config"]["model"]["unet"]["ch"] = 16
    torch.save(ckpt, trained / "models/mismatch.pt")
    line = fails(trained, ("ema", "--checkpoint", "models/mismatch.pt", "--out", "models/ema_new.pt",
                           "--metrics", "metrics/ema_new.json"),
                 naming="checkpoint models/mismatch.pt: its ema weights do not match its stored config",
                 keeps=["models/ema_new.pt", "metrics/ema_new.json"])
    assert "of another shape" in line
    ckpt = torch.load(trained / "models/model.pt", weights_only=True)  # the average fits, the raw weights not
    ckpt["model"] = {k: v[:1] if v.ndim else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, trained / "models/mismatch.pt")
    fails(trained, ("ema", "--checkpoint", "models/mismatch.pt", "--out", "models/ema_new.pt",
                    "--metrics", "metrics/ema_new.json"),
          naming="its raw weights do not match its stored config", keeps=["models/ema_new.pt"])


SAMPLE = ("sample", "--sampler", "ddim", "--steps", "2", "--device", "cpu")


def test_a_kill_between_sample_writes_leaves_the_old_cell_whole(trained):
    out = trained / "cells/ddim-2"
    assert cli(trained, *SAMPLE, "--out", "cells/ddim-2").exit_code == 0
    before = files(out)
    assert {"samples.pt", "grid.png", "strip.png", "info.json", "system.json"} <= before.keys()
    params = (trained / "params.yaml").read_text()
    try:
        set_params(trained, lambda p: p["sample"].update(seed=7))  # other samples
        kill_at_grid = ("import os, signal, pipeline.images as c\n"
                        "c.write_image_grid = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
                        "from pipeline.cli import app\napp()\n")
        r = subprocess.run(python("-c", kill_at_grid, *SAMPLE, "--out", "cells/ddim-2"), cwd=trained,
                           env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == -signal.SIGKILL, r.stderr
        assert files(out) == before, "the killed run left a mix of new and old files in the cell"
        ok = cli(trained, *SAMPLE, "--out", "cells/ddim-2")  # the next run: a whole new cell, no leftovers
        assert ok.exit_code == 0, ok.output
        after = files(out)
        assert after.keys() == before.keys() and after["samples.pt"] != before["samples.pt"]
        assert after["grid.png"] != before["grid.png"]
        assert sorted(p.name for p in out.parent.iterdir()) == ["ddim-2"]
    finally:
        (trained / "params.yaml").write_text(params)


# --------------------------------------------------------------------------- 4. a full disk
@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(folder, size)``: files opened by ``ddpm.files`` under ``folder`` share ``size`` bytes;
    a write beyond them fails with ENOSPC, as on a full device."""
    real = os.fdopen
    limits = {}

    class Full:
        def __init__(self, f, folder):
            self.f, self.folder = f, folder

        def write(self, data):
            n = memoryview(data).nbytes
            if limits[self.folder] < n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            limits[self.folder] -= n
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, *args, **kwargs):
        f = real(fd, *args, **kwargs)
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        for folder in limits:
            if folder in path.parents:
                return Full(f, folder)
        return f

    monkeypatch.setattr(ddpm.files.os, "fdopen", fdopen)

    def limit(folder: Path, size: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        limits[folder.resolve()] = size
    return limit


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_sample_to_a_full_disk_is_one_line_and_keeps_the_old_cell(trained, full_disk):
    out = trained / "full/ddim-2"
    assert cli(trained, *SAMPLE, "--out", "full/ddim-2").exit_code == 0
    before = files(out)
    full_disk(trained / "full", 2048)  # system.json fits, samples.pt (24 images of 8×8, in a zip) does not
    line = fails(trained, (*SAMPLE, "--out", "full/ddim-2"), naming="cannot write full/ddim-2/samples.pt: no space "
                                                                  "left on device (it needs ")
    assert files(out) == before and sorted(p.name for p in out.parent.iterdir()) == ["ddim-2"]
    needed = line.split("it needs ")[1].split(",")[0]
    assert needed.endswith("KiB") and float(needed.split()[0]) > 2, line


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_train_to_a_full_disk_is_one_line_and_resumes(tmp_path, full_disk):
    root = workspace(tmp_path, steps=4)
    outs = ("--out", "full/models/model.pt", "--metrics", "full/metrics/train.json", "--plot", "full/plots/loss.csv",
            "--snapshots", "full/models/ema_snapshots", "--samples", "full/plots/train_samples")
    full_disk(root / "full", 64 * 1024)
    fails(root, ("train", "--device", "cpu", *outs), naming="cannot write full/models/model.pt: no space left "
                                                           "on device (it needs ")
    assert not (root / "full/models/model.pt").exists() and not list((root / "full").rglob(".*tmp*"))
    assert list((root / "checkpoints").glob("train-*.pt")), "the resume state was lost"
    full_disk(root / "full", 1 << 30)
    again = cli(root, "train", "--device", "cpu", *outs)
    assert again.exit_code == 0 and "resuming from step 4" in again.output, again.output
    assert (root / "full/models/model.pt").is_file()


def mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if not shutil.which("mount") or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_a_real_full_tmpfs(trained, tmp_path):
    """The reproduction of the issue, on a real 16 KiB and a real 600 KiB tmpfs (root only)."""
    small, medium = tmp_path / "16k", tmp_path / "600k"
    if not mount_tmpfs(small, "16k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        assert mount_tmpfs(medium, "600k")
        r = subprocess.run(python("-m", "pipeline", *SAMPLE, "--out", str(small / "cell")), cwd=trained,
                           env=subprocess_env(), capture_output=True, text=True, timeout=300)
        lines = [x for x in r.stderr.splitlines() if "Traceback" in x or x.startswith("error")]
        assert r.returncode == 1 and lines == [x for x in lines if x.startswith("error")] and len(lines) == 1, r.stderr
        assert f"cannot write {small / 'cell'}/" in lines[0] and ": no space left on device (it needs" in lines[0]
        assert files(small) == {}
        ws = workspace(tmp_path / "ws", steps=2)
        outs = [a for name in ("out", "metrics", "plot", "timing", "snapshots", "samples", "mlflow-run",
                               "system-metrics")
                for a in (f"--{name}", str(medium / name))]
        r = subprocess.run(python("-m", "pipeline", "train", "--device", "cpu", "--no-live", *outs), cwd=ws,
                           env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert errors(r) and "no space left on device" in errors(r)[0], r.stderr
        assert list((ws / "checkpoints").glob("train-*.pt")), "the resume state was lost"
    finally:
        for m in (small, medium):
            subprocess.run(["umount", str(m)], capture_output=True)
