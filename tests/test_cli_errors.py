"""Every command checks its inputs before any work: a bad input fails with one line
naming the file or key, exit status 1, and what earlier runs produced stays untouched."""

import json

import pytest
import torch
import yaml
from tiny import cli, errors, workspace, write_params  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

SENTINEL = b"produced by an earlier run"


def fails(root, args, *, naming: str, keeps: list[str] = ()):
    """Run a command that must fail: one error line naming ``naming``; ``keeps`` unchanged."""
    for f in keeps:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(SENTINEL)
    result = cli(root, *args)
    assert result.exit_code == 1, result.output
    lines = errors(result)
    assert len(lines) == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert naming in lines[0], lines[0]
    for f in keeps:
        assert (root / f).read_bytes() == SENTINEL, f"{f} was overwritten"
    return lines[0]


TRAIN = ("train", "--device", "cpu", "--out", "models/new.pt", "--metrics", "metrics/new.json")


def test_params_file_missing(tmp_path):
    workspace(tmp_path)
    fails(tmp_path, (*TRAIN, "--params", "nope.yaml"), naming="nope.yaml", keeps=["models/new.pt"])


@pytest.mark.parametrize("key, value, naming", [
    ("lr", "fast", "train.lr"),  # wrong type
    ("bogus", 1, "train.bogus"),  # unknown key
    ("augment", "vflip", "train.augment"),  # bad choice
    ("steps", 0, "train.steps"),  # out of range (test_e2e: `dvc exp run -S train.steps=0` fails in check)
])
def test_bad_train_param(tmp_path, key, value, naming):
    workspace(tmp_path, **{key: value})
    # ParamsError lists every bad key, one per line, under a line naming the file
    result = cli(tmp_path, *TRAIN)
    assert result.exit_code == 1 and naming in result.stderr and "params.yaml" in result.stderr


def test_invalid_param_combination(tmp_path):
    """A combination across sections (sample.steps beyond timesteps) is the check stage's, which runs first and
    validates the whole file; a stage validates its own sections only (train reads neither sample.steps nor
    the matrix)."""
    from helpers import REPO

    workspace(tmp_path)
    p = yaml.safe_load((tmp_path / "params.yaml").read_text())
    p["sample"]["steps"] = [2, 5000]  # more than timesteps
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    result = cli(tmp_path, "check", "--dvc-yaml", str(REPO / "dvc.yaml"), "--out", "logs/check.json")
    assert result.exit_code == 1 and "sample.steps [5000] must lie in [1, timesteps=" in result.stderr
    assert not (tmp_path / "logs/check.json").exists()
    assert cli(tmp_path, *TRAIN).exit_code == 0


def test_batch_not_divisible_by_processes_is_checked_before_work(tmp_path, monkeypatch):
    workspace(tmp_path, batch_size=7)
    monkeypatch.setenv("WORLD_SIZE", "2")
    fails(tmp_path, TRAIN, naming="global batch size 7 is not divisible by the 2 processes",
          keeps=["models/new.pt"])


def test_train_data_missing(tmp_path):
    workspace(tmp_path)
    fails(tmp_path, (*TRAIN, "--data", "data/none.pt"), naming="data/none.pt", keeps=["models/new.pt"])


def test_train_data_corrupt(tmp_path):
    workspace(tmp_path)
    (tmp_path / "data/prepared/train.pt").write_bytes(b"not a torch file")
    fails(tmp_path, TRAIN, naming="data/prepared/train.pt", keeps=["models/new.pt", "metrics/new.json"])


def test_train_data_not_a_split(tmp_path):
    workspace(tmp_path)
    torch.save({"images": torch.zeros(3, 1, 8, 8)}, tmp_path / "data/prepared/train.pt")
    fails(tmp_path, TRAIN, naming="data/prepared/train.pt", keeps=["models/new.pt"])


def test_classifier_test_split_missing(tmp_path):
    workspace(tmp_path)
    (tmp_path / "data/prepared/test.pt").unlink()
    fails(tmp_path, ("classifier", "--device", "cpu", "--out", "models/c.pt"), naming="data/prepared/test.pt",
          keeps=["models/c.pt"])


def test_prepare_missing_dataset_files(tmp_path):
    workspace(tmp_path)  # data.root points at a folder without IDX files, download off
    fails(tmp_path, ("prepare", "--out", "out"), naming="no-idx", keeps=["out/train.pt"])


def test_prepare_corrupt_dataset_file(tmp_path, idx_dir):
    workspace(tmp_path)
    bad = tmp_path / "no-idx"
    bad.mkdir()
    for f in idx_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes()[:40] if "train-images" in f.name else f.read_bytes())
    fails(tmp_path, ("prepare", "--out", "out"), naming="no-idx", keeps=["out/train.pt"])


SAMPLE = ("sample", "--sampler", "ddim", "--steps", "2", "--out", "cell", "--device", "cpu")


def test_sample_truncated_checkpoint(trained):
    model = trained / "models/model.pt"
    (trained / "models/cut.pt").write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    fails(trained, (*SAMPLE, "--checkpoint", "models/cut.pt"), naming="models/cut.pt",
          keeps=["cell/samples.pt", "cell/grid.png"])


def test_sample_checkpoint_that_is_not_a_diffusion_model(trained):
    ckpt = torch.load(trained / "models/model.pt", weights_only=True)
    ckpt["config"] = {"classifier": {}}
    torch.save(ckpt, trained / "models/other.pt")
    fails(trained, (*SAMPLE, "--checkpoint", "models/other.pt"), naming="models/other.pt",
          keeps=["cell/samples.pt"])


def test_sample_checkpoint_missing(trained):
    fails(trained, (*SAMPLE, "--checkpoint", "models/none.pt"), naming="models/none.pt", keeps=["cell/samples.pt"])


def test_sample_unknown_sampler(trained):
    fails(trained, ("sample", "--sampler", "plms", "--steps", "2", "--out", "cell"), naming="'plms'",
          keeps=["cell/samples.pt"])


def test_sample_steps_out_of_range(trained):
    fails(trained, ("sample", "--sampler", "ddim", "--steps", "5000", "--out", "cell", "--device", "cpu"),
          naming="steps must be in [1, 1000]", keeps=["cell/samples.pt"])


FID = ("fid", "--samples", "cell/samples.pt", "--out", "metrics/cell.json", "--device", "cpu")


@pytest.fixture(scope="module")
def reference(trained):
    """Reference statistics (fid-ref) of the 8×8 test split, with an untrained classifier."""
    from ddpm.checkpoint import save_checkpoint
    from ddpm.classifier import Classifier, ClassifierConfig

    model = Classifier(ClassifierConfig(width=4, feature_dim=8), in_channels=1, num_classes=10)
    config = {"classifier": {"arch": {"width": 4, "feature_dim": 8}, "in_channels": 1, "num_classes": 10}}
    save_checkpoint(trained / "models/classifier.pt", step=0, config=config, model=model.state_dict())
    assert cli(trained, "fid-ref", "--device", "cpu").exit_code == 0
    return trained / "data/reference/stats.pt"


@pytest.mark.parametrize("images, naming", [
    (torch.zeros(10, 3, 8, 8, dtype=torch.uint8), "have shape [3, 8, 8], the reference"),  # wrong channels
    (torch.zeros(10, 1, 16, 16, dtype=torch.uint8), "have shape [1, 16, 16], the reference"),  # wrong size
    (torch.zeros(10, 8, 8, dtype=torch.uint8), "must be a uint8 tensor [N, C, H, W]"),  # wrong rank
    (torch.zeros(10, 1, 8, 8), "must be a uint8 tensor [N, C, H, W]"),  # wrong dtype
])
def test_fid_samples_with_wrong_shape(trained, reference, images, naming):
    (trained / "cell").mkdir(exist_ok=True)
    torch.save({"images": images, "sampler": "ddim", "steps": 2}, trained / "cell/samples.pt")
    line = fails(trained, FID, naming=naming, keeps=["metrics/cell.json"])
    assert "cell/samples.pt" in line


def test_fid_samples_corrupt(trained):
    (trained / "cell").mkdir(exist_ok=True)
    (trained / "cell/samples.pt").write_bytes(b"\x80\x04garbage")
    fails(trained, FID, naming="cell/samples.pt", keeps=["metrics/cell.json"])


def test_report_cell_missing_or_incomplete(tmp_path):
    workspace(tmp_path)
    keeps = ["metrics/fid.json", "reports/fid_vs_steps.png", "reports/report.md"]
    fails(tmp_path, ("report",), naming="metrics/cells/ddpm-2.json", keeps=keeps)
    cells = tmp_path / "metrics/cells"
    cells.mkdir(parents=True)
    for s in yaml.safe_load((tmp_path / "params.yaml").read_text())["sample"]["samplers"]:  # every sampler
        for k in (2, 3):
            (cells / f"{s}-{k}.json").write_text(json.dumps({"fid": 1.0, "kid_mean": 0.1, "extractor": "x",
                                                             "num_samples": 4, "ruler": {"id": "r"}}))
    (cells / "ddim-3.json").write_text(json.dumps({"fid": 1.0}))
    fails(tmp_path, ("report",), naming="metrics/cells/ddim-3.json lacks kid_mean", keeps=keeps)
    (cells / "ddim-3.json").write_text("{not json")
    fails(tmp_path, ("report",), naming="metrics/cells/ddim-3.json is not valid JSON", keeps=keeps)


def test_log_before_report(tmp_path):
    workspace(tmp_path)
    fails(tmp_path, ("log",), naming="metrics/fid.json")


def test_resume_require_without_state(tmp_path):
    workspace(tmp_path)
    fails(tmp_path, (*TRAIN, "--resume", "require"), naming="checkpoints/train-", keeps=["models/new.pt"])


# --------------------------------------------------------------------------- outputs that cannot be written
def blocked(root, name="blocker"):
    """A file where a folder must be: nothing can be written below it (even as root)."""
    (root / name).write_text("a file, not a folder")
    return f"{name}/out"


def test_train_unwritable_output_fails_before_training(tmp_path):
    workspace(tmp_path)
    out = blocked(tmp_path)
    line = fails(tmp_path, ("train", "--device", "cpu", "--out", f"{out}/model.pt"), naming=f"{out}/model.pt",
                 keeps=["models/model.pt"])
    assert "blocker is a file, not a folder" in line
    assert not list(tmp_path.glob("checkpoints/*"))  # no step was trained (checkpoint_every 2)
    fails(tmp_path, ("train", "--device", "cpu", "--metrics", "models"), naming="models: it is a folder")


@pytest.mark.skipif(hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
                    reason="root writes into read-only folders")
def test_train_output_in_a_read_only_folder(tmp_path):
    workspace(tmp_path)
    (tmp_path / "ro").mkdir(mode=0o555)
    fails(tmp_path, ("train", "--device", "cpu", "--out", "ro/model.pt"), naming="ro is not writable")


def test_sample_unwritable_output_fails_before_sampling(trained):
    out = blocked(trained)
    fails(trained, ("sample", "--sampler", "ddim", "--steps", "2", "--out", out, "--device", "cpu"),
          naming=f"cannot write {out}/samples.pt")


# --------------------------------------------------------------------------- one clear line each
def test_checkpoint_whose_config_does_not_match_its_weights(trained):
    ckpt = torch.load(trained / "models/model.pt", weights_only=True)
    ckpt["config"]["model"]["unet"]["ch"] = 16
    torch.save(ckpt, trained / "models/mismatch.pt")
    line = fails(trained, (*SAMPLE, "--checkpoint", "models/mismatch.pt"), naming="models/mismatch.pt",
                 keeps=["cell/samples.pt"])
    assert "do not match its stored config" in line and "of another shape" in line


def test_samples_without_sampler_key(trained):
    (trained / "cell").mkdir(exist_ok=True)
    torch.save({"images": torch.zeros(4, 1, 8, 8, dtype=torch.uint8), "steps": 2}, trained / "cell/samples.pt")
    fails(trained, FID, naming="cell/samples.pt lacks sampler", keeps=["metrics/cell.json"])


def test_truncated_png_in_an_image_folder_is_named(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.effect_noise((32, 32), 40 + i).save(tmp_path / "imgs" / c / f"{i}.png")
    png = tmp_path / "imgs/b/1.png"
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])  # cut in the middle of the pixel data
    workspace(tmp_path)
    write_params(tmp_path, top={"data": {"name": "folder", "root": str(tmp_path / "imgs"), "image_size": 8}})
    fails(tmp_path, ("prepare", "--out", "out"), naming=f"{png}", keeps=["out/train.pt"])


# --------------------------------------------------------------------------- the check stage
CHECK = ("check", "--dvc-yaml", "dvc.yaml", "--out", "logs/check.json")


def test_check_stage(tmp_path, idx_dir):
    import shutil

    from helpers import REPO

    workspace(tmp_path)
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    fails(tmp_path, CHECK, naming="no-idx", keeps=["logs/check.json"])  # data.root without the data set
    p = yaml.safe_load((tmp_path / "params.yaml").read_text())
    p["data"]["root"] = str(idx_dir)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    (tmp_path / "logs/check.json").unlink()
    ok = cli(tmp_path, *CHECK)
    assert ok.exit_code == 0, ok.output
    first = (tmp_path / "logs/check.json").read_bytes()
    p["sample"]["num_samples"], p["train"]["lr"] = 40, 1.0e-3  # a valid change: the same output
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    assert cli(tmp_path, *CHECK).exit_code == 0 and (tmp_path / "logs/check.json").read_bytes() == first
    (tmp_path / "samples").write_text("a file where the sample folders go")
    fails(tmp_path, CHECK, naming="cannot write samples: it is a file", keeps=["logs/check.json"])


# --------------------------------------------------------------------------- from any directory
@pytest.mark.slow
def test_console_script_and_python_m_from_a_subdirectory(tmp_path, idx_dir):
    """Installed as `make` installs it (pip install --no-deps --no-build-isolation -e .), into a
    throwaway environment that borrows the project's packages."""
    import site
    import subprocess
    import sys

    from helpers import REPO

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (next(venv.glob("lib/python*/site-packages")) / "borrowed.pth").write_text(site.getsitepackages()[0] + "\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install", "-q", "--no-deps",
                    "--no-build-isolation", "-e", str(REPO)], check=True, env=env, capture_output=True)
    workspace(tmp_path / "ws")
    (tmp_path / "ws/sub").mkdir()
    p = yaml.safe_load((tmp_path / "ws/params.yaml").read_text())
    p["data"]["root"] = str(idx_dir)
    (tmp_path / "ws/params.yaml").write_text(yaml.safe_dump(p))
    (tmp_path / "ws/dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    for cmd in ([str(venv / "bin/ddpm-pipeline")], [str(venv / "bin/python"), "-m", "pipeline"]):
        r = subprocess.run([*cmd, "check", "--params", "../params.yaml", "--dvc-yaml", "../dvc.yaml", "--out",
                            "check.json"], cwd=tmp_path / "ws/sub", env=env, capture_output=True, text=True)
        assert r.returncode == 0 and "check: ../params.yaml is valid" in r.stdout, r.stdout + r.stderr
        assert (tmp_path / "ws/sub/check.json").is_file()


def test_every_stage_depends_on_the_check_stage():
    from helpers import REPO

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert next(iter(stages)) == "check" and stages["check"]["always_changed"]
    check_out = next(iter(stages["check"]["outs"][0]))  # logs/check.json (then when the pipeline run started)
    assert check_out == "logs/check.json"
    assert [name for name, s in stages.items() if name != "check" and check_out not in s["deps"]] == []
