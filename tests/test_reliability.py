"""Reliability, round two (issue 22): a crafted data file runs no code, staging never hides new
data, a full disk is one line, the ema stage checks its checkpoint, a sample cell is one unit,
and the validation gaps (a boolean for a number, attention at no resolution of the network, an
empty params file, a bad IDX magic number). Each test failed before its fix. The `dvc exp run`
matrix case is in tests/test_exp_run.py.

Round three (issue 33): weights, images, features and metrics are finite or refused, and no JSON
holds NaN; `check` refuses sample sizes that make a metric meaningless; SIGTERM stops `train`
(resume state of its step, MLflow run KILLED, exit 143: also to a real process and under
torchrun), `sample`, `log` and `study run` as Ctrl-C does; a study's size is said at once and
bounded, and its checks scale; nothing temporary is left behind; an image too large for memory is
refused from its header. Each of these tests failed on 2140b3c."""

import errno
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, make_idx_dir, synthetic_images, write_idx
from test_data import write_cifar
from tiny import cli, errors, python, subprocess_env, weights, workspace

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


@pytest.mark.slow
def test_a_real_full_tmpfs(trained, tmp_path):
    """The reproduction of the issue, on a real 16 KiB and a real 600 KiB tmpfs (root only): two stage
    processes (slow; the simulated full disk above is the quick check)."""
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


# =========================================================================== round three (issue 33)
# --------------------------------------------------------------------------- 1. finite or refused
def poison(src: Path, dst: Path, part: str, value: float = float("nan")) -> str:
    """``src``'s checkpoint with one value of its first floating-point ``part`` tensor (``model`` or
    ``ema``) set to ``value``, written to ``dst``; the name of that tensor as the stored weights name it."""
    ckpt = torch.load(src, weights_only=True)
    name = next(k for k, v in ckpt[part].items() if v.is_floating_point() and v.numel() > 1)
    ckpt[part][name].view(-1)[1] = value
    torch.save(ckpt, dst)
    return name.removeprefix("module.")


def test_ema_refuses_weights_that_are_not_finite(trained):
    name = poison(trained / "models/model.pt", trained / "models/nan.pt", "ema")
    line = fails(trained, ("ema", "--checkpoint", "models/nan.pt", "--out", "models/nan_ema.pt",
                           "--metrics", "metrics/nan_ema.json"),
                 naming=f"checkpoint models/nan.pt: its ema weights are not finite: the first bad tensor is {name} "
                        "(1 of ", keeps=["models/nan_ema.pt", "metrics/nan_ema.json"])
    assert "values NaN" in line
    poison(trained / "models/model.pt", trained / "models/inf.pt", "model", float("inf"))  # one ∞ in the raw weights
    fails(trained, ("ema", "--checkpoint", "models/inf.pt", "--out", "models/nan_ema.pt", "--metrics",
                    "metrics/nan_ema.json"), naming="its raw weights are not finite", keeps=["models/nan_ema.pt"])


@pytest.mark.parametrize("command, keeps", [
    (SAMPLE + ("--out", "nan-cell"), "nan-cell/samples.pt"),
    (("nll", "--device", "cpu", "--metrics", "metrics/nan_nll.json", "--plot", "plots/nan_nll.csv"),
     "metrics/nan_nll.json"),
    (("denoise", "--device", "cpu", "--metrics", "metrics/nan_denoise.json", "--plot", "plots/nan_denoise.csv"),
     "metrics/nan_denoise.json"),
    (("export", "--out", "nan-exported"), "nan-exported/model_index.json"),
], ids=["sample", "nll", "denoise", "export"])
def test_sample_nll_denoise_and_export_refuse_weights_that_are_not_finite(trained, command, keeps):
    """The issue's case: a checkpoint with one NaN (or ∞) sampled all-black images, which scored FID 6.93."""
    name = poison(trained / "models/model_ema.pt", trained / "models/nan_ema.pt", "ema")
    fails(trained, (*command, "--checkpoint", "models/nan_ema.pt"),
          naming=f"checkpoint models/nan_ema.pt: its ema weights are not finite: the first bad tensor is {name}",
          keeps=[keeps])


def test_sample_checks_its_images_before_writing(trained, monkeypatch):
    import pipeline.stages.sample as stage

    assert cli(trained, *SAMPLE, "--out", "nan-cells/ddim-2").exit_code == 0
    before = files(trained / "nan-cells/ddim-2")
    real = stage.sample
    monkeypatch.setattr(stage, "sample", lambda *a, **k: real(*a, **k) / 0 * 0)  # finite weights, NaN images
    line = fails(trained, (*SAMPLE, "--out", "nan-cells/ddim-2"), naming="the samples are not finite: ")
    assert "of batch 0 (images 0–11) are NaN or infinite" in line and "nothing is written" in line
    assert files(trained / "nan-cells/ddim-2") == before
    assert sorted(p.name for p in (trained / "nan-cells").iterdir()) == ["ddim-2"], "a temporary cell was left"


def test_a_metrics_file_is_valid_json_or_not_written(tmp_path):
    from ddpm.errors import NonFiniteError
    from pipeline.outputs import write_json, write_metrics

    path = tmp_path / "cell.json"
    for write in (write_json, write_metrics):
        with pytest.raises(NonFiniteError, match=r"cell.json: not written, floor.isc_mean is not finite"):
            write(path, {"floor": {"fid": 6.93, "isc_mean": float("nan"), "values": [1.0]}})
        assert not path.exists()
    with pytest.raises(NonFiniteError, match=r"kid_mean, runs.1 are not finite"):
        write_json(path, {"kid_mean": float("inf"), "runs": [0.5, -float("inf")]})
    write_json(path, {"fid": 6.93})
    assert json.loads(path.read_text()) == {"fid": 6.93}


def test_metrics_refuse_features_that_are_not_finite_and_sets_too_small():
    from ddpm import metrics as M
    from ddpm.errors import NonFiniteError

    g = torch.Generator().manual_seed(0)
    gen = torch.randn(40, 8, generator=g, dtype=torch.float64)
    ref = torch.randn(50, 8, generator=g, dtype=torch.float64)
    gen[3, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"the features of the generated images are not finite \(1 of 40 images\)"):
        M.metrics_from_features({"features": gen}, M.reference_statistics({"features": ref}), kid_subset_size=20)
    gen[3, 2] = 0.0
    # KID subsets larger than the generated set were silently shrunk to it
    with pytest.raises(ValueError, match=r"too few generated images for the metrics: 40 \(KID draws subsets of "
                                         r"kid_subset_size = 45 images\)"):
        M.metrics_from_features({"features": gen}, M.reference_statistics({"features": ref}), kid_subset_size=45)
    # the Inception Score of 8 images in 10 splits was NaN
    logits = torch.randn(8, 10, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"8 \(the Inception Score splits the set into 10 parts\)"):
        M.metrics_from_features({"features": gen[:8], "logits": logits}, M.reference_statistics({"features": ref}),
                                kid_subset_size=8)
    m = M.metrics_from_features({"features": gen[:10], "logits": torch.randn(10, 10, generator=g).double()},
                                M.reference_statistics({"features": ref}), kid_subset_size=10)
    assert all(math.isfinite(v) for v in m.values()) and m["isc_mean"] >= 1


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> Path:
    """A workspace with the tiny classifier and the reference statistics of its test split."""
    root = workspace(tmp_path_factory.mktemp("scored"))
    for args in (("classifier",), ("fid-ref", "--device", "cpu")):
        result = cli(root, *args)
        assert result.exit_code == 0, result.output
    return root


def test_fid_refuses_too_few_samples_instead_of_writing_nan(scored):
    """The issue's case: 8 samples, kid_subset_size 12: `fid` wrote "isc_mean": NaN and a KID of 8-image subsets."""
    torch.save({"images": synthetic_images(8, 3, size=8)[0], "sampler": "ddim", "steps": 2}, scored / "eight.pt")
    line = fails(scored, ("fid", "--samples", "eight.pt", "--out", "metrics/eight.json", "--device", "cpu"),
                 naming="too few generated images for the metrics: 8 (KID draws subsets of kid_subset_size = 12 images",
                 keeps=["metrics/eight.json"])
    assert "the Inception Score splits the set into 10 parts" in line


def test_a_classifier_that_is_not_finite_is_refused_as_the_fid_ruler(scored):
    name = poison(scored / "models/classifier.pt", scored / "models/nan_classifier.pt", "model")
    fails(scored, ("fid-ref", "--device", "cpu", "--classifier", "models/nan_classifier.pt", "--out", "nan_reference"),
          naming=f"classifier checkpoint models/nan_classifier.pt: its weights are not finite: the first bad tensor "
                 f"is {name}", keeps=["nan_reference/stats.pt"])


# --------------------------------------------------------------------------- 2. consistent sample sizes
@pytest.mark.parametrize("num_samples, kid_subset_size, says", [
    (8, 12, "KID draws subsets of kid_subset_size = 12 images; the Inception Score splits the set into 10 parts"),
    (12, 13, "KID draws subsets of kid_subset_size = 13 images"),
    (9, 2, "the Inception Score splits the set into 10 parts"),
    (3, 2, "precision/recall look at each image's 3 nearest other images"),
])
def test_check_refuses_too_few_samples_for_the_metrics(tmp_path, num_samples, kid_subset_size, says):
    root = workspace(tmp_path)
    set_params(root, lambda p: (p["sample"].update(num_samples=num_samples), p["fid"].update(
        kid_subset_size=kid_subset_size)))
    (root / "dvc.yaml").write_text("stages: {}\n")
    line = fails(root, ("check", "--out", "logs/check.json"), naming=f"sample.num_samples {num_samples} is too few "
                                                                    "for the metrics of a sample cell and of the "
                                                                    "real-data floor", keeps=["logs/check.json"])
    assert says in line and line.endswith("raise sample.num_samples or lower fid.kid_subset_size")


# --------------------------------------------------------------------------- 3. SIGTERM is a stop, not a crash
class SigtermNotHandled(Exception):
    """The test's own SIGTERM handler ran: the command under test did not handle SIGTERM."""


@pytest.fixture
def sigterm_safety_net():
    """While a test sends SIGTERM to its own process, a command that does not handle it fails the test
    (``SigtermNotHandled``) instead of killing pytest."""
    def handler(signum, frame):
        raise SigtermNotHandled("SIGTERM reached the test's handler")

    old = signal.signal(signal.SIGTERM, handler)
    yield
    signal.signal(signal.SIGTERM, old)


def sigterm_during(monkeypatch, module, name: str, call: int = 1):
    """``module.name`` sends SIGTERM to this process on its ``call``-th call, then does its work."""
    real, calls = getattr(module, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def stops(root, args, *, says: str, env=None):
    """Run a command that SIGTERM stops: exit status 143, one stderr line ``error: stopped by SIGTERM …``."""
    result = cli(root, *args, env=env)
    assert result.exit_code == 143, (result.output, result.exception)
    lines = errors(result)
    assert len(lines) == 1 and lines[0].startswith("error: stopped by SIGTERM") and says in lines[0], result.stderr
    return lines[0]


STATE = "checkpoints/train_state.pt"  # an explicit --state: one file for any config


def test_sigterm_stops_train_at_the_end_of_its_step_with_a_resume_state(tmp_path, monkeypatch, sigterm_safety_net):
    import ddpm.training

    cfg = dict(steps=8, checkpoint_every=4, ema_snapshot_every=2)
    root, ref = workspace(tmp_path / "stopped", **cfg), workspace(tmp_path / "ref", **cfg)
    with monkeypatch.context() as m:
        sigterm_during(m, ddpm.training, "training_terms", call=3)  # in step 3
        stops(root, ("train", "--device", "cpu", "--state", STATE),
              says=f"at step 3 of 8; its resume state is {STATE}: the same command resumes from step 3")
    state = torch.load(root / STATE, weights_only=True)
    assert state["step"] == 3 and state["ema_snapshots"] == [2], "the resume state is not of the step it stopped at"
    assert not (root / "models/model.pt").exists()
    resumed = cli(root, "train", "--device", "cpu", "--state", STATE)
    assert resumed.exit_code == 0 and "resuming from step 3" in resumed.stdout, resumed.output
    assert cli(ref, "train", "--device", "cpu").exit_code == 0
    a, b = weights(ref / "models/model.pt"), weights(root / "models/model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a), "a run resumed from its SIGTERM state differs from one not stopped"
    assert (root / "plots/train_loss.csv").read_text() == (ref / "plots/train_loss.csv").read_text()


def sigterm_twice_in_step(step: int, monkeypatch) -> None:
    """Train's ``step``-th step sends this process SIGTERM twice at once, before the step ends."""
    import ddpm.training

    real, calls = ddpm.training.training_terms, [0]

    def twice(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(ddpm.training, "training_terms", twice)


def test_a_second_sigterm_stops_train_at_once_keeping_the_last_resume_state(tmp_path, monkeypatch,
                                                                             sigterm_safety_net):
    import pipeline.stages._cli

    monkeypatch.setattr(pipeline.stages._cli, "SAME_STOP_SECONDS", 0.0)  # the second comes later than that
    root = workspace(tmp_path, steps=8, checkpoint_every=2)
    sigterm_twice_in_step(4, monkeypatch)
    stops(root, ("train", "--device", "cpu", "--state", STATE),
          says=f"at step 3 of 8; the last resume state is {STATE} at step 2: the same command resumes from there")
    assert torch.load(root / STATE, weights_only=True)["step"] == 2


@pytest.mark.slow
def test_sigterm_to_a_real_train_process_marks_its_run_killed_and_leaves_a_resume_state(tmp_path):
    """The issue's case: SIGTERM to `train` (a preemptible GPU, `timeout`, SLURM, Kubernetes) exited 143 with no
    message, left the MLflow run RUNNING with no end time, and lost the steps since the last resume state."""
    import mlflow

    cfg = dict(steps=60, checkpoint_every=4, log_every=2, ema_snapshot_every=4)
    root, ref = workspace(tmp_path / "stopped", **cfg), workspace(tmp_path / "ref", **cfg)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**subprocess_env(PIPELINE_LIVE_MLFLOW="1"), "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.Popen(python("-m", "pipeline", "train", "--device", "cpu"), cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list((root / "checkpoints").glob("train-*.pt")):  # the first resume state: training runs
        assert proc.poll() is None and time.monotonic() < deadline, "train ended before its first resume state"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    (line,) = [x for x in err.splitlines() if x.startswith("error")]
    step = int(line.split("at step ")[1].split()[0])
    state = state_of(root)
    assert line == (f"error: stopped by SIGTERM at step {step} of 60; its resume state is {state}: the same "
                    f"command resumes from step {step}"), err
    assert 4 <= step < 60 and torch.load(root / state, weights_only=True)["step"] == step
    client = mlflow.MlflowClient(uri)
    (killed,) = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
    assert killed.info.status == "KILLED" and killed.info.end_time is not None, killed.info
    assert f"MLflow run {killed.info.run_id} marked KILLED" in out

    resumed = subprocess.run(python("-m", "pipeline", "train", "--device", "cpu"), cwd=root, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and f"resuming from step {step} of {state}" in resumed.stdout, resumed.stderr
    (run,) = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"  # the same run, continued
    assert cli(ref, "train", "--device", "cpu").exit_code == 0
    a, b = weights(ref / "models/model.pt"), weights(root / "models/model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs from one never stopped"


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_at_the_same_step(tmp_path):
    """Under torchrun (2 gloo processes) the launcher passes SIGTERM on to every rank; the ranks agree at the
    next logged step, rank 0 writes the resume state of that step and says so, and none waits for another."""
    root = workspace(tmp_path, steps=200, checkpoint_every=4, log_every=3, ema_snapshot_every=50)
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pipeline", "train",
                "--device", "cpu")
    proc = subprocess.Popen(python(*torchrun), cwd=root, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list((root / "checkpoints").glob("train-*.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, "train ended before its first resume state"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)  # no rank left waiting for the other
    (line,) = [x for x in err.splitlines() if x.startswith("error")]
    step = int(line.split("at step ")[1].split()[0])
    assert step % 3 == 0 and step < 200 and f"its resume state is {state_of(root)}" in line, err
    assert torch.load(root / state_of(root), weights_only=True)["step"] == step


def test_a_sigterm_delivered_twice_at_once_is_one_stop(tmp_path, monkeypatch, sigterm_safety_net):
    """`scancel` (and a preemption) signals every process of a SLURM job, and the job's script passes the signal
    on to the run: train gets SIGTERM twice within milliseconds, and must still stop at its step's end with its
    resume state (a test of the SLURM study found it stopping at once, with none)."""
    root = workspace(tmp_path, steps=8, checkpoint_every=2)
    sigterm_twice_in_step(4, monkeypatch)  # SIGTERM from SLURM, and the same from the batch script
    stops(root, ("train", "--device", "cpu", "--state", STATE),
          says=f"at step 4 of 8; its resume state is {STATE}: the same command resumes from step 4")
    assert torch.load(root / STATE, weights_only=True)["step"] == 4


def test_a_deferred_sigterm_stops_at_once_when_no_safe_point_comes(monkeypatch, sigterm_safety_net):
    import pipeline.stages._cli
    from pipeline.stages._cli import Terminated, stop_at_safe_point

    with stop_at_safe_point(grace=0.2) as stop:  # a safe point: the stop is asked for, and nothing is raised
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop()
        time.sleep(0.4)
    start = time.monotonic()
    with pytest.raises(Terminated, match=r"\(no safe point within 0.2 s\)"), stop_at_safe_point(grace=0.2):
        os.kill(os.getpid(), signal.SIGTERM)
        while time.monotonic() - start < 5:  # work that never asks: stopped by the grace timer, not by its end
            time.sleep(0.01)
    with stop_at_safe_point(grace=60) as stop:  # the same SIGTERM twice at once: one stop, asked for
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop()
    monkeypatch.setattr(pipeline.stages._cli, "SAME_STOP_SECONDS", 0.0)
    with pytest.raises(Terminated), stop_at_safe_point(grace=60):  # a second SIGTERM: at once
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    with pytest.raises(SigtermNotHandled):  # the handler before the block is back
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)


def test_sigterm_stops_sample_leaving_the_old_cell(trained, monkeypatch, sigterm_safety_net):
    import pipeline.stages.sample as stage

    assert cli(trained, *SAMPLE, "--out", "term-cells/ddim-2").exit_code == 0
    before = files(trained / "term-cells/ddim-2")
    sigterm_during(monkeypatch, stage, "sample")
    stops(trained, (*SAMPLE, "--out", "term-cells/ddim-2"), says="")
    assert files(trained / "term-cells/ddim-2") == before
    assert sorted(p.name for p in (trained / "term-cells").iterdir()) == ["ddim-2"], "a temporary cell was left"


def test_sigterm_stops_log_marking_its_open_runs_killed(tmp_path, monkeypatch, sigterm_safety_net):
    import mlflow

    import pipeline.tracking.system_metrics
    from test_tracking import finished_workspace, parent_runs

    root = finished_workspace(tmp_path / "ws")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "DVC_EXP_NAME": "term"}
    with monkeypatch.context() as m:  # while the first sample cell's run is open
        sigterm_during(m, pipeline.tracking.system_metrics, "mlflow_metrics")
        stops(root, ("log",), says="", env=env)
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
    assert runs and {r.info.status for r in runs} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in runs]
    assert all(r.info.end_time is not None for r in runs)
    again = cli(root, "log", env=env)  # logs the run in full; the killed attempt is deleted
    assert again.exit_code == 0, again.output
    (parent,) = parent_runs(uri)
    assert parent.info.status == "FINISHED" and parent.info.run_id not in {r.info.run_id for r in runs}


def test_sigterm_stops_following_a_study(tmp_path, monkeypatch, sigterm_safety_net):
    from pipeline.experiments import dvc_api, study_queue
    from pipeline.tracking import study as study_mlflow

    root = study_workspace(tmp_path, seeds=1)
    monkeypatch.setattr(study_queue, "exp_show", lambda: [])
    monkeypatch.setattr(study_queue, "current_check", lambda: lambda rev: True)
    queued = {}
    monkeypatch.setattr(dvc_api, "queued", lambda: dict(queued))
    monkeypatch.setattr(study_queue, "queue", lambda r: queued.update({r.name: f"rev-{r.name}"}))
    monkeypatch.setattr(study_mlflow, "ensure_database", lambda *a: None)
    monkeypatch.setattr(dvc_api, "start_workers", lambda jobs: os.kill(os.getpid(), signal.SIGTERM))
    result = cli(root, "study", "run", "studies/s.yaml")
    assert result.exit_code == 143, (result.output, result.exception)
    assert "study run: stopped following; 2 runs go on in DVC's queue" in result.stdout


# --------------------------------------------------------------------------- 4. bounded requests
def study_workspace(root: Path, seeds: int, extra: str = "") -> Path:
    """A workspace with dvc.yaml and ``studies/s.yaml``: 2 experiments × ``seeds`` seeds."""
    workspace(root)
    shutil.copyfile(REPO / "dvc.yaml", root / "dvc.yaml")
    set_params(root, lambda p: p["data"].update(name="folder", root=str(folder_of_images(root / "imgs")),
                                                image_size=8))
    (root / "studies").mkdir()
    (root / "studies/s.yaml").write_text(f"experiments:\n  baseline: []\n  cosine: [schedule=cosine]\n"
                                         f"seeds: {list(range(seeds))}\n{extra}")
    return root


def folder_of_images(root: Path) -> Path:
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.effect_noise((16, 16), 40 + i).save(root / c / f"{i}.png")
    return root


def test_a_study_of_10000_runs_applies_the_overrides_once_per_experiment(tmp_path, monkeypatch):
    """The issue's case: 2 experiments × 5000 seeds; `study run --dry` applied and checked every run's -S through
    DVC (200 runs took 30.5 s: about 19 minutes). Each experiment is applied once; its seeds are derived."""
    from pipeline.experiments import dvc_api, exp_run
    from pipeline.experiments.study import load

    root = study_workspace(tmp_path, seeds=5000)
    real, calls = dvc_api.apply_overrides, []

    def counted(path, overrides):
        calls.append(list(overrides))
        if len(calls) > 10:
            raise AssertionError("the overrides were applied once per run")
        return real(path, overrides)

    monkeypatch.setattr(dvc_api, "apply_overrides", counted)
    old = os.getcwd()
    os.chdir(root)
    try:
        study = load(Path("studies/s.yaml"))
        assert len(calls) == 2 and len(study.runs) == len(study.params) == 10000
        for r in (study.runs[0], study.runs[4321], study.runs[-1]):  # as DVC makes them, run by run
            assert study.params[r.name] == exp_run.apply(Path("params.yaml"), list(r.overrides)), r.name
    finally:
        os.chdir(old)


class Queued(Exception):
    """``study_queue.run`` was called: the study would have been queued."""


@pytest.fixture
def no_dvc(monkeypatch):
    """`study run` without DVC: nothing done, nothing queued; queueing raises ``Queued``."""
    from pipeline.experiments import dvc_api, study_queue

    def run(study, todo, *args):
        raise Queued(len(todo))

    monkeypatch.setattr(study_queue, "exp_show", lambda: [])
    monkeypatch.setattr(study_queue, "current_check", lambda: lambda rev: True)
    monkeypatch.setattr(dvc_api, "queued", lambda: {})
    monkeypatch.setattr(study_queue, "run", run)


def test_a_study_says_its_size_at_once_and_queues_no_more_than_its_limit_unconfirmed(tmp_path, no_dvc):
    root = study_workspace(tmp_path, seeds=51)  # 102 runs, over the default limit of 100
    result = cli(root, "study", "run", "studies/s.yaml")
    assert result.exit_code == 1 and result.stdout.startswith(
        "study s: 102 runs (2 experiments × 51 seeds); checking their params\n"), result.output
    assert errors(result) == ["error: studies/s.yaml: it would queue 102 runs, more than the limit of 100 (the "
                              "default): each is a DVC experiment that trains and samples; pass --yes, or set "
                              "max_runs: 102 in studies/s.yaml, to queue them"]
    dry = cli(root, "study", "run", "studies/s.yaml", "--dry")
    assert dry.exit_code == 0 and dry.stdout.count("would queue: dvc exp run") == 102, dry.output
    assert "a real run would refuse: it would queue 102 runs" in dry.stdout
    confirmed = cli(root, "study", "run", "studies/s.yaml", "--yes")
    assert isinstance(confirmed.exception, Queued) and confirmed.exception.args == (102,)
    (root / "studies/s.yaml").write_text((root / "studies/s.yaml").read_text() + "max_runs: 102\n")
    allowed = cli(root, "study", "run", "studies/s.yaml")
    assert isinstance(allowed.exception, Queued), allowed.output


# --------------------------------------------------------------------------- 5. nothing left behind
@pytest.mark.slow
def test_sigterm_to_a_dry_study_run_leaves_no_temporary_files(tmp_path):
    """The issue's case: `study run --dry` stopped by SIGTERM left /tmp/tmp*/params.yaml (exp_run's temporary
    folder). Here SIGTERM comes while the overrides are applied in that folder, to a real process."""
    root = study_workspace(tmp_path / "ws", seeds=2)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    script = ("import os, signal\nfrom pipeline.experiments import dvc_api\nreal = dvc_api.apply_overrides\n"
              "def apply(path, overrides):\n    print('applying in', path.parent, flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n    return real(path, overrides)\n"
              "dvc_api.apply_overrides = apply\nfrom pipeline.cli import app\napp()\n")
    r = subprocess.run(python("-c", script, "study", "run", "studies/s.yaml", "--dry"), cwd=root,
                       env=subprocess_env(TMPDIR=str(tmp)), capture_output=True, text=True, timeout=300)
    assert f"applying in {tmp}/" in r.stdout, r.stdout + r.stderr
    assert r.returncode == 143, r.stderr
    assert errors(r) == ["error: stopped by SIGTERM"], r.stderr
    assert not list(tmp.iterdir()), f"left behind: {list(tmp.rglob('*'))}"


def test_a_diverged_run_leaves_no_staging_folders(tmp_path, monkeypatch):
    """The issue's case: a loss that diverged before the first resume state left
    checkpoints/train-<fp>.samples/ and .snapshots/ with no .pt beside them."""
    from test_resume import inject

    root = workspace(tmp_path, steps=8, checkpoint_every=4, ema_snapshot_every=2, sample_every=2)
    inject(monkeypatch, at_step=3)
    result = cli(root, "train", "--device", "cpu")
    assert result.exit_code == 1 and "training loss became nan at step 3" in errors(result)[0], result.output
    assert not list((root / "checkpoints").iterdir()), list((root / "checkpoints").iterdir())


def test_a_run_stopped_after_its_resume_state_keeps_its_staging_folders(tmp_path, monkeypatch):
    from test_resume import inject

    root = workspace(tmp_path, steps=8, checkpoint_every=4, ema_snapshot_every=2, sample_every=2)
    inject(monkeypatch, at_step=6, error=KeyboardInterrupt)
    result = cli(root, "train", "--device", "cpu")
    assert result.exit_code == 130 and errors(result) == [
        f"error: stopped by Ctrl-C at step 5 of 8; the last resume state is {state_of(root)} at step 4: the same "
        "command resumes from there"], result.output
    assert sorted(p.suffix for p in (root / "checkpoints").iterdir()) == [".pt", ".samples", ".snapshots"]


def state_of(root: Path) -> str:
    (state,) = (root / "checkpoints").glob("train-*.pt")
    return str(state.relative_to(root))


# --------------------------------------------------------------------------- 6. images too big for memory
def png_header_of(path: Path, width: int, height: int) -> Path:
    """A grayscale PNG of ``width`` × ``height`` black pixels, compressed row by row (a few KB on disk)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row, parts = zlib.compressobj(9), bytes(width + 1), []
    for _ in range(height):
        parts.append(z.compress(row))
    parts.append(z.flush())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


def test_an_image_too_large_for_memory_is_refused_before_it_is_decoded(tmp_path):
    """The issue's case: a 140 KB PNG of 12000 × 12000 made prepare take 2.7 GB. With image_size 8 the limit is
    36 megapixels; this one (7000 × 7000, 49 megapixels, below PIL's own limit) is refused from its header."""
    imgs = folder_of_images(tmp_path / "imgs")
    big = png_header_of(imgs / "b/big.png", 7000, 7000)
    assert big.stat().st_size < 200_000
    root = workspace(tmp_path / "ws")
    set_params(root, lambda p: p["data"].update(name="folder", root=str(imgs), image_size=8))
    fails(root, ("prepare", "--out", "out"), keeps=["out/train.pt"],
          naming=f"image {big} is 7000 × 7000 = 49.0 megapixels, more than the limit of 36.0 megapixels for an "
                 "image folder with image_size 8 (decoding it takes about 0.6 GiB); shrink it, or raise "
                 "data.max_pixels")


def test_data_max_pixels_sets_the_limit(tmp_path):
    imgs = folder_of_images(tmp_path / "imgs")  # 16 × 16 = 256 pixels each
    root = workspace(tmp_path / "ws")
    set_params(root, lambda p: p["data"].update(name="folder", root=str(imgs), image_size=8, max_pixels=255))
    fails(root, ("prepare", "--out", "out"), naming="is 16 × 16 = 256 pixels, more than the limit of 255 pixels")
    set_params(root, lambda p: p["data"].update(max_pixels=256))
    result = cli(root, "prepare", "--out", "out")
    assert result.exit_code == 0, result.output
    assert torch.load(root / "out/train.pt", weights_only=True)["images"].shape[1:] == (1, 8, 8)
