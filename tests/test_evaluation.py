"""Evaluation: metrics against independent computations, reference statistics that
follow their inputs, the per-experiment report and the cross-experiment comparison,
all on tiny synthetic data or recorded metrics files (CPU seconds)."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import yaml
from helpers import REPO, synthetic_images, tiny_params
from typer.testing import CliRunner

from ddpm import metrics as M
from ddpm.checkpoint import save_checkpoint
from ddpm.classifier import Classifier, ClassifierConfig, train_classifier
from ddpm.data import DataError, Split, save_split
from helpers import stage_keys
from pipeline.cli import app
from pipeline.experiments.compare import experiment_rows, render
from pipeline.images import StripRecorder
from pipeline.stages import fid as fid_stage
from pipeline.stages import fid_floor as floor_stage
from pipeline.stages import fid_ref as ref_stage
from pipeline.stages import report as report_stage


def write_classifier(path: Path, seed: int, steps: int = 0) -> Path:
    torch.manual_seed(seed)
    model = Classifier(ClassifierConfig(width=8, feature_dim=16), in_channels=1, num_classes=10)
    if steps:
        images, labels = synthetic_images(256, seed=seed)
        train_classifier(model, images, labels.long(), steps=steps, batch_size=32, lr=3e-3, seed=seed, device="cpu")
    config = {"classifier": {"arch": {"width": 8, "feature_dim": 16}, "in_channels": 1, "num_classes": 10}}
    save_checkpoint(path, step=0, config=config, model=model.state_dict())
    return path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    return write_classifier(tmp_path_factory.mktemp("clf") / "classifier.pt", seed=0, steps=10)


def independent_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance ||μ1-μ2||² + Tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½) with numpy/scipy only."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


# ----------------------------------------------------------------------------- metrics
def test_fid_of_a_set_against_itself_is_zero(classifier):
    images, _ = synthetic_images(200, seed=3)
    feats = M.extract_features(images, weights_path=classifier, batch_size=64)
    m = M.metrics_from_features(feats, M.reference_statistics(feats), kid_subset_size=50)
    assert abs(m["fid"]) < 1e-6
    assert abs(m["kid_mean"]) < 3 * m["kid_std"] + 1e-9  # unbiased MMD² on random subsets: zero within noise
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    # the one-call path through the same extractor agrees
    assert abs(M.compute_metrics(images, images, weights_path=classifier, kid_subset_size=50)["fid"]) < 1e-6


@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_fid_equals_an_independent_frechet_distance_on_the_same_features(classifier):
    a, _ = synthetic_images(300, seed=4)
    b = (255 - a.int()).to(torch.uint8)  # a visibly different set: the negatives
    fa = M.extract_features(a, weights_path=classifier, batch_size=128)
    fb = M.extract_features(b, weights_path=classifier, batch_size=128)
    assert fa["features"].shape == (300, 16) and fa["logits"].shape == (300, 10)
    m = M.metrics_from_features(fb, M.reference_statistics(fa), kid_subset_size=100)
    expected = independent_fid(fb["features"].numpy(), fa["features"].numpy())
    assert expected > 1e-3
    assert m["fid"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert m["kid_mean"] > 0 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and m["isc_mean"] >= 1


def test_fid_matches_on_gaussian_features_with_known_distance():
    g = torch.Generator().manual_seed(0)
    f1 = torch.randn(1500, 5, generator=g, dtype=torch.float64)
    f2 = torch.randn(1500, 5, generator=g, dtype=torch.float64) * 2 + 1
    m = M.metrics_from_features({"features": f2}, M.reference_statistics({"features": f1}), kid_subset_size=200)
    assert m["fid"] == pytest.approx(independent_fid(f2.numpy(), f1.numpy()), rel=1e-6)
    # population value: 5·1² + 5·(1 + 4 - 2·2) = 10
    assert m["fid"] == pytest.approx(10.0, rel=0.1)
    assert "isc_mean" not in m  # no logits, no Inception Score


@pytest.mark.parametrize("n_gen,n_ref,subset", [(300, 500, 100), (120, 80, 80), (30, 30, 2)])
def test_kid_equals_torch_fidelity(n_gen, n_ref, subset):
    """KID computed as batched subsets on the features' device equals torch-fidelity's NumPy loop
    (same subset draws, kernel and estimator) to float64 rounding."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    g = torch.Generator().manual_seed(5)
    gen = torch.randn(n_gen, 16, generator=g, dtype=torch.float64) * 1.3 + 0.2
    ref = torch.randn(n_ref, 16, generator=g, dtype=torch.float64)
    ours = M.kid(gen, ref, subset, seed=2020, chunk=7)
    theirs = kid_features_to_metric(gen, ref, kid_subsets=100, kid_subset_size=subset, rng_seed=2020, verbose=False)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-9, abs=1e-12)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-9, abs=1e-12)
    assert ours["kid_mean"] != 0
    with pytest.raises(ValueError, match="subset size"):
        M.kid(gen, ref, min(n_gen, n_ref) + 1)


@pytest.mark.parametrize("n_gen,n_ref", [(40, 300), (300, 40), (5, 5)])
def test_precision_recall_with_stored_radii_equals_torch_fidelity(n_gen, n_ref):
    """The reference's radii computed once (reference_statistics) give exactly torch-fidelity's
    precision, recall and F-score; on clustered features, so that neither is trivially 0 or 1."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    g = torch.Generator().manual_seed(n_gen)
    centres = torch.randn(6, 8, generator=g, dtype=torch.float64) * 3
    # generated around centres 0-3, reference around 2-5: each has vectors far from the other
    gen = centres[torch.randint(0, 4, (n_gen,), generator=g)] + torch.randn(n_gen, 8, generator=g, dtype=torch.float64)
    ref = centres[torch.randint(2, 6, (n_ref,), generator=g)] + torch.randn(n_ref, 8, generator=g, dtype=torch.float64)
    expected = prc_features_to_metric(gen.float(), ref.float(), prc_neighborhood=3, prc_batch_size=10000,
                                      save_cpu_ram=True, verbose=False)
    stats = M.reference_statistics({"features": ref})
    assert stats["prc_radii"].shape == (n_ref,)
    got = M.precision_recall(gen, ref, stats["prc_radii"])
    assert got == {k: expected[k] for k in ("precision", "recall", "f_score")}
    assert M.precision_recall(gen, ref) == got  # radii computed on the spot: the same
    if n_gen > 5:
        assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1


@pytest.mark.parametrize("n,d", [(300, 16), (57, 5), (10, 1)])
def test_fid_and_inception_score_equal_torch_fidelity_bit_for_bit(n, d):
    """FID's statistics and distance and the Inception Score, written here so that a fid process need
    not import torch-fidelity, are its functions call for call: the same float64 results, exactly."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric

    g = torch.Generator().manual_seed(n)
    f1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    f2 = torch.randn(n + 7, d, generator=g, dtype=torch.float64) * 1.5 + 0.3
    ours = [M.fid_statistics(f) for f in (f1, f2)]
    theirs = [fid_features_to_statistics(f) for f in (f1, f2)]
    for a, b in zip(ours, theirs):
        assert np.array_equal(a["mu"], b["mu"]) and np.array_equal(a["sigma"], b["sigma"])
    if d > 1:  # torch-fidelity's distance wants 2-D covariances (metrics_from_features gives it them)
        expected = fid_statistics_to_metric(*theirs, verbose=False)["frechet_inception_distance"]
        assert M.frechet_distance(*ours) == expected and expected > 0
    logits = torch.randn(n, 10, generator=g) * 3
    for seed in (2020, 7):
        i = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=seed)
        assert M.inception_score(logits, rng_seed=seed) == {"isc_mean": i["inception_score_mean"],
                                                             "isc_std": i["inception_score_std"]}


@pytest.mark.slow
def test_a_fid_cell_with_the_classifier_does_not_import_torch_fidelity(tmp_path, idx_dir, classifier):
    """torch-fidelity's package imports every extractor it ships (CLIP, torchvision, torch._dynamo): 2 s
    of each fid process on a 2-core CPU. With the ddpm-classifier extractor a cell needs none of it."""
    import os
    import subprocess
    import sys

    test, samples, params = _stage_files(tmp_path, idx_dir, seed=6)
    ref_stage.main(params, test, classifier, tmp_path / "reference", "cpu", debug=True)
    code = ("import sys; from pipeline.stages import fid; "
            f"fid.main({str(params)!r}, {str(samples)!r}, {str(tmp_path / 'reference/stats.pt')!r}, {str(classifier)!r}, "
            f"{str(tmp_path / 'cell.json')!r}, 'cpu', debug=True); "
            "print(sorted(m for m in ('torch_fidelity', 'torchvision', 'torch._dynamo') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout
    assert json.loads((tmp_path / "cell.json").read_text())["fid"] >= 0


def test_inception_without_network_or_weights_fails_fast_with_one_line(monkeypatch, tmp_path):
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached download
    monkeypatch.setattr(inc, "URL_INCEPTION_V3", "http://127.0.0.1:9/weights-inception.pth")
    start = time.perf_counter()
    with pytest.raises(M.ExtractorUnavailable) as e:
        M.create_extractor("inception-v3-compat")
    assert time.perf_counter() - start < 30
    msg = str(e.value)
    assert "\n" not in msg and "fid.weights_path" in msg and "127.0.0.1:9" in msg
    with pytest.raises(M.ExtractorUnavailable, match="does not exist"):
        M.create_extractor("inception-v3-compat", tmp_path / "missing.pth")


# ------------------------------------------------------------------ reference statistics
def test_reference_key_follows_dataset_split_extractor_and_resolution(tmp_path, classifier):
    images, _ = synthetic_images(20, seed=0)
    other_images, _ = synthetic_images(20, seed=1)
    other_clf = write_classifier(tmp_path / "other.pt", seed=1)
    base = ref_stage.reference_key(images, "test", "ddpm-classifier", classifier)
    assert base == ref_stage.reference_key(images.clone(), "test", "ddpm-classifier", classifier)
    variants = [ref_stage.reference_key(other_images, "test", "ddpm-classifier", classifier),
                ref_stage.reference_key(images, "train", "ddpm-classifier", classifier),
                ref_stage.reference_key(images, "test", "ddpm-classifier", other_clf),
                ref_stage.reference_key(images, "test", "inception-v3-compat", None),
                ref_stage.reference_key(torch.nn.functional.pad(images, (2, 2, 2, 2)), "test", "ddpm-classifier",
                                        classifier)]
    assert all(v != base for v in variants)


def _stage_files(tmp_path: Path, idx_dir: Path, seed: int) -> tuple[Path, Path, Path]:
    images, labels = synthetic_images(64, seed=seed)
    test = tmp_path / "prepared" / "test.pt"
    save_split(Split(images, labels.long(), [str(i) for i in range(10)]), test)
    samples = tmp_path / "samples.pt"
    torch.save({"images": synthetic_images(32, seed=9)[0], "sampler": "ddim", "steps": 2}, samples)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(idx_dir)))
    return test, samples, params


def test_reference_statistics_are_recomputed_and_stale_ones_refused(tmp_path, idx_dir, classifier):
    test, samples, params = _stage_files(tmp_path, idx_dir, seed=5)
    ref_dir, cell = tmp_path / "reference", tmp_path / "cell.json"
    ref_stage.main(params, test, classifier, ref_dir, "cpu", debug=True)
    first = torch.load(ref_dir / "stats.pt", weights_only=True)
    assert first["mu"].shape == (16,) and first["sigma"].shape == (16, 16) and first["num_images"] == 64
    fid_stage.main(params, samples, ref_dir / "stats.pt", classifier, cell, "cpu", debug=True)
    m = json.loads(cell.read_text())
    assert {"fid", "kid_mean", "precision", "recall", "isc_mean"} <= m.keys() and m["reference_images"] == 64

    # the real-data floor: all 64 reference images themselves score FID 0; 16 of them (sample.num_samples) do not
    p = yaml.safe_load(params.read_text())
    for n, zero in ((64, True), (16, False)):
        p["sample"]["num_samples"] = n
        params.write_text(yaml.safe_dump(p))
        floor_stage.main(params, test, ref_dir / "stats.pt", classifier, tmp_path / "floor.json", "cpu", debug=True)
        floor = json.loads((tmp_path / "floor.json").read_text())["floor"]
        assert floor["num_images"] == n and floor["reference_images"] == 64
        assert (abs(floor["fid"]) < 1e-6) == zero and floor["recall"] > 0.5

    # another data set: the statistics change with it
    test2, _, _ = _stage_files(tmp_path / "b", idx_dir, seed=6)
    ref_stage.main(params, test2, classifier, tmp_path / "reference2", "cpu", debug=True)
    second = torch.load(tmp_path / "reference2" / "stats.pt", weights_only=True)
    assert second["key"]["data_sha256"] != first["key"]["data_sha256"]
    assert not torch.allclose(second["mu"], first["mu"])

    # another extractor (weights) without re-running fid_ref: refused, not silently reused (also by the floor)
    other = write_classifier(tmp_path / "other.pt", seed=2)
    with pytest.raises(DataError, match="another weights_sha256.*fid_ref"):
        fid_stage.main(params, samples, ref_dir / "stats.pt", other, cell, "cpu", debug=True)
    with pytest.raises(DataError, match="another weights_sha256.*fid_ref"):
        floor_stage.main(params, test, ref_dir / "stats.pt", other, tmp_path / "floor.json", "cpu", debug=True)
    p = yaml.safe_load(params.read_text())
    p["fid"]["extractor"] = "inception-v3-compat"
    p["fid"]["weights_path"] = str(other)  # any existing file: the check comes before loading it
    params.write_text(yaml.safe_dump(p))
    with pytest.raises(DataError, match="another extractor"):
        fid_stage.main(params, samples, ref_dir / "stats.pt", classifier, cell, "cpu", debug=True)


def test_dvc_recomputes_the_reference_when_its_inputs_change():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    ref, floor, fid = stages["fid_ref"], stages["fid_floor"], stages["fid"]
    assert {"data/prepared/test.pt", "models/classifier.pt", "ddpm/metrics.py",
            "ddpm/classifier.py"} <= set(ref["deps"]) and "data/prepared/train.pt" not in ref["deps"]
    assert ref["params"] == stage_keys()["fid_ref"] and "fid.extractor" in ref["params"]
    assert not any(k.startswith("sample") for k in ref["params"])  # a sampling change keeps the reference
    assert ref["outs"] == ["data/reference"] and "metrics" not in ref
    # the real-data floor: sample.num_samples training images against the reference, re-run by sampling params
    assert {"data/prepared/train.pt", "data/reference/stats.pt", "models/classifier.pt"} <= set(floor["deps"])
    assert {"sample.num_samples", "sample.seed"} <= set(floor["params"]) == set(stage_keys()["fid_floor"])
    assert floor["metrics"] == [{"metrics/fid_floor.json": {"cache": False}}]
    assert "metrics/fid_floor.json" in stages["report"]["deps"]
    assert "data/reference/stats.pt" in fid["deps"] and "data/prepared/test.pt" not in fid["deps"]
    assert "--reference data/reference/stats.pt" in fid["cmd"]
    assert stages["report"]["params"] == stage_keys()["report"]


# ----------------------------------------------------------------------------- strips
def test_strip_keeps_x_T_and_evenly_spaced_steps(tmp_path):
    x_T = torch.randn(12, 1, 8, 8)
    rec = StripRecorder(x_T, steps=50, rows=4, columns=6)
    for t in range(50):
        rec(t, torch.full_like(x_T, -1.0 + t / 25), None)
    assert len(rec.frames) == 6 and rec.frames[0].shape == (4, 1, 8, 8)
    rec.save(tmp_path / "strip.png")
    from PIL import Image

    assert Image.open(tmp_path / "strip.png").size == (6 * 10 + 2, 4 * 10 + 2)
    few = StripRecorder(x_T, steps=2)
    for t in range(2):
        few(t, x_T, None)
    assert len(few.frames) == 3


# ----------------------------------------------------------------------------- report
def _png(path: Path, shade: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (10, 10), shade).save(path)


RULER = {"id": "0123456789ab", "extractor": "ddpm-classifier", "weights_sha256": "1" * 64, "reference_sha256": "2" * 64}


def test_report_from_recorded_metrics(tmp_path, idx_dir):
    params = tmp_path / "params.yaml"
    p = tiny_params(idx_dir)
    p["sample"].update(samplers=["ddpm", "ddim"], steps=[2, 3])
    params.write_text(yaml.safe_dump(p))
    cells = tmp_path / "metrics" / "cells"
    fids = {("ddpm", 2): 31.5, ("ddpm", 3): 20.25, ("ddim", 2): 12.0, ("ddim", 3): 9.75}
    for (s, k), f in fids.items():
        cells.mkdir(parents=True, exist_ok=True)
        (cells / f"{s}-{k}.json").write_text(json.dumps(
            {"sampler": s, "steps": k, "num_samples": 24, "reference_images": 128, "extractor": "ddpm-classifier",
             "fid": f, "kid_mean": f / 1000, "kid_std": 0.001, "precision": 0.5, "recall": 0.25, "f_score": 0.33,
             "isc_mean": 3.0, "isc_std": 0.1, "ruler": RULER}))
    (tmp_path / "metrics" / "classifier.json").write_text(json.dumps({"classifier": {"test_accuracy": 0.9123}}))
    (tmp_path / "metrics" / "floor.json").write_text(json.dumps(
        {"floor": {"fid": 0.79, "precision": 0.7, "recall": 0.89, "num_images": 400, "reference_images": 128}}))
    (tmp_path / "loss.csv").write_text("step,loss\n2,0.9\n4,0.5\n6,0.3\n")
    for name in ("ddpm-2", "ddim-3"):
        _png(tmp_path / "samples" / name / "grid.png", 200)
    _png(tmp_path / "samples" / "ddim-3" / "strip.png", 100)
    r = tmp_path / "reports"

    def report(classifier_metrics):
        report_stage.main(params, cells, tmp_path / "metrics" / "fid.json", tmp_path / "plots" / "fid.csv",
                          r / "fid_vs_steps.png", r / "report.md", r / "report.html", classifier_metrics,
                          tmp_path / "loss.csv", r / "train_loss.png", tmp_path / "samples",
                          tmp_path / "metrics" / "ema.json", tmp_path / "plots" / "sigma.csv",
                          tmp_path / "plots" / "sweep.csv", r / "sweep.png", tmp_path / "metrics" / "floor.json",
                          tmp_path / "metrics" / "nll.json", tmp_path / "metrics" / "denoise.json", debug=True)

    # the ddpm-classifier extractor's accuracy is required, and checked before anything is written
    with pytest.raises(FileNotFoundError, match="accuracy belongs in the report"):
        report(tmp_path / "metrics" / "absent.json")
    assert not (tmp_path / "metrics" / "fid.json").exists() and not r.exists()
    report(tmp_path / "metrics" / "classifier.json")

    fid = json.loads((tmp_path / "metrics" / "fid.json").read_text())
    assert fid == {"best": {"fid": 9.75, "sampler": "ddim", "steps": 3}, "ruler": RULER["id"],
                   "fid": {"ddpm": {"2": 31.5, "3": 20.25}, "ddim": {"2": 12.0, "3": 9.75}}}
    csv = (tmp_path / "plots" / "fid.csv").read_text().splitlines()  # the rest of each cell: a plot
    assert csv[0] == "sampler,steps,fid,kid_mean,precision,recall,isc_mean,line"
    assert csv[1] == "ddpm,2,31.5,0.0315,0.5,0.25,3.0,ddpm" and csv[4].startswith("ddim,3,9.75,")
    md = (r / "report.md").read_text()
    # DDIM Table 1 layout: rows = samplers, columns = steps
    assert "| sampler | 2 steps | 3 steps |" in md and "| ddpm | 31.50 | 20.25 |" in md
    assert "| ddim | 12.00 | **9.75** |" in md  # the best cell, marked
    assert "**Real-data floor**: FID 0.79, precision 0.700, recall 0.890 (400 real" in md
    assert "0.9123" in md and "](../samples/ddim-3/strip.png)" in md and "](train_loss.png)" in md
    html = (r / "report.html").read_text()
    assert "<tr><th>Real-data floor</th><td>FID 0.79" in html
    assert "<tr><th>sampler</th><th>2 steps</th><th>3 steps</th></tr>" in html
    assert '<tr><th>ddim</th><td class="n">12.00</td><td class="n best">9.75</td></tr>' in html
    assert html.count("data:image/png;base64,") == 3 + 2 + 1  # figures, two grids, one strip
    # an unconditional model: precision vs recall per cell, no class accuracy, no guidance table
    assert (tmp_path / "plots" / "sweep.csv").read_text().splitlines()[1] == "ddpm-2,ddpm,2,none,0.0,31.5,,0.5,0.25"
    assert "Precision vs recall" in md and "Guidance sweep" not in md
    assert "src=\"../" not in html and "0.9123" in html and "ddpm-3 samples: missing" in html
    assert (r / "fid_vs_steps.png").stat().st_size > 0 and (r / "train_loss.png").stat().st_size > 0


def test_dvc_plot_template_draws_one_line_per_sampler():
    template = json.loads((REPO / ".dvc" / "plots" / "fid_by_sampler.json").read_text())
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["report"]
    assert stage["plots"][0]["plots/fid_vs_steps.csv"]["template"] == "fid_by_sampler"
    # one colour per line: a sampler, or samplers with the same images (the CSV's `line`, ddim ≈ euler); rows
    # of revisions written before that column fall back to their sampler
    assert template["encoding"]["color"]["field"] == "line"
    assert template["transform"] == [{"calculate": "datum.line ? datum.line : datum.sampler", "as": "line"}]
    assert template["encoding"]["strokeDash"]["field"] == "rev"
    assert "<DVC_METRIC_DATA>" in json.dumps(template)


# ----------------------------------------------------------------------------- compare
def _rev(rev: str, name, schedule: str, prediction: str, fid: float, bpd: float | None = None) -> dict:
    metrics = {"metrics/fid.json": {"data": {"best": {"fid": fid, "sampler": "ddim", "steps": 50}}},
               "metrics/classifier.json": {"data": {"classifier": {"test_accuracy": 0.91}}}}
    if bpd is not None:
        metrics["metrics/nll.json"] = {"data": {"nll": {"bits_per_dim": bpd}}}
    return {"rev": rev, "name": name, "data": {"rev": rev, "params": {"params.yaml": {"data": {
        "schedule": schedule, "prediction": prediction, "train": {"steps": 800}}}}, "metrics": metrics}}


def exp_show_fixture(with_bpd: bool) -> list:
    """The shape of `dvc exp show --json` (DVC 3): commits with their experiments."""
    head = "a" * 40
    base = _rev(head, "main", "linear", "eps", 30.0, 4.1 if with_bpd else None)
    base["experiments"] = [
        {"name": "cosine-exp", "executor": None, "revs": [_rev("b" * 40, "cosine-exp", "cosine", "eps", 21.5,
                                                               3.9 if with_bpd else None)]},
        {"name": "v-exp", "executor": None, "revs": [_rev("c" * 40, "v-exp", "linear", "v", 25.0)]},
        {"name": "failed", "executor": None, "revs": [{"rev": "d" * 40, "name": "failed", "error": {"msg": "x"},
                                                       "data": {"params": {}, "metrics": {}}}]}]
    ws = _rev("workspace", None, "linear", "eps", 28.0)
    ws["experiments"] = None
    return [ws, base]


def test_compare_on_recorded_experiments(tmp_path):
    rows = experiment_rows(exp_show_fixture(with_bpd=True), ["schedule", "prediction"])
    assert [r["experiment"] for r in rows] == ["workspace", "main", "cosine-exp", "v-exp"]
    assert rows[2]["bits_per_dim"] == 3.9 and rows[3]["bits_per_dim"] is None
    text = render(rows, "schedule", "prediction", [])
    assert "| schedule \\ prediction | eps | v |" in text
    assert "| cosine | 21.500 (3.900) | – |" in text
    assert "| linear | 28.000 | 25.000 |" in text  # best of workspace (28) and main (30)
    assert "bits/dim" in text

    path = tmp_path / "exp.json"
    path.write_text(json.dumps(exp_show_fixture(with_bpd=False)))
    res = CliRunner().invoke(app, ["compare", "--exp-json", str(path), "--param", "train.steps",
                                   "--param", "schedule", "--out", str(tmp_path / "compare.md")])
    assert res.exit_code == 0, res.output
    assert "bits/dim" not in res.output and "| cosine-exp | bbbbbbb | cosine | eps | 800 | 21.500 | ddim-50 |" in res.output
    assert "| experiment | rev | schedule | prediction | train.steps | best FID |" in res.output  # schedule once
    assert (tmp_path / "compare.md").read_text().startswith("## Experiments")
    assert len(json.loads((tmp_path / "compare.json").read_text())) == 4


def test_compare_flags_fids_measured_with_different_rulers():
    """Two experiments whose FIDs come from different rulers (another classifier's weights, say): the table
    says so, marks the odd one, and the pivot compares only the experiments of one ruler."""
    show = exp_show_fixture(with_bpd=False)
    for node, ruler in ((show[1], "aaaaaaaaaaaa"), (show[1]["experiments"][0]["revs"][0], "aaaaaaaaaaaa"),
                        (show[1]["experiments"][1]["revs"][0], "bbbbbbbbbbbb"), (show[0], "aaaaaaaaaaaa")):
        node["data"]["metrics"]["metrics/fid.json"]["data"]["ruler"] = ruler
    rows = experiment_rows(show, ["schedule", "prediction"])
    assert {r["experiment"]: r["ruler"] for r in rows}["v-exp"] == "bbbbbbbbbbbb"
    text = render(rows, "schedule", "prediction", [])
    assert "measured with 2 different rulers" in text and "| bbbbbbbbbbbb † |" in text
    pivot = text.split("## schedule × prediction")[1]
    assert "| schedule \\ prediction | eps |" in pivot and "25.000" not in pivot  # v-exp's FID is left out
    # one ruler: no warning, no column
    same = experiment_rows(exp_show_fixture(with_bpd=False), ["schedule", "prediction"])
    assert "different rulers" not in render(same, "schedule", "prediction", []) and "ruler" not in render(
        same, "schedule", "prediction", [])


def test_compare_reports_a_missing_file_in_one_line(tmp_path):
    res = CliRunner().invoke(app, ["compare", "--exp-json", str(tmp_path / "nope.json")])
    assert res.exit_code == 1 and "does not exist" in res.output


def test_progress_off_a_terminal_writes_whole_lines(capsys):
    from pipeline.progress import progress

    with progress(3, "extract") as bar:
        for _ in range(3):
            bar(1)
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n") and "extract: 100%" in err.splitlines()[-1]


def _seed_rev(rev: str, seed: int, prediction: str, fids: dict, bpd: float) -> dict:
    cells = {"fid": {s: {str(k): v for k, v in by.items()} for s, by in fids.items()}}
    best = min(((s, k, v) for s, by in fids.items() for k, v in by.items()), key=lambda x: x[2])
    cells["best"] = {"fid": best[2], "sampler": best[0], "steps": best[1]}
    metrics = {"metrics/fid.json": {"data": cells}, "metrics/nll.json": {"data": {"nll": {"bits_per_dim": bpd}}}}
    return {"rev": rev, "name": f"exp-{rev[0]}", "data": {"rev": rev, "params": {"params.yaml": {"data": {
        "seed": seed, "prediction": prediction, "schedule": "linear", "train": {"steps": 800}}}}, "metrics": metrics}}


def test_compare_groups_seeds_into_mean_and_std():
    revs = [_seed_rev("a" * 40, 0, "eps", {"ddim": {20: 30.0}, "ddpm": {20: 40.0}}, 4.0),
            _seed_rev("b" * 40, 1, "eps", {"ddim": {20: 34.0}, "ddpm": {20: 38.0}}, 4.2),
            _seed_rev("c" * 40, 2, "eps", {"ddim": {20: 32.0}, "ddpm": {20: 42.0}}, 4.4),
            _seed_rev("d" * 40, 0, "v", {"ddim": {20: 20.0}, "ddpm": {20: 25.0}}, 3.0),
            _seed_rev("e" * 40, 1, "v", {"ddim": {20: 22.0}, "ddpm": {20: 21.0}}, 3.2),
            _seed_rev("f" * 40, 0, "x0", {"ddim": {20: 50.0}, "ddpm": {20: 55.0}}, 5.0)]  # one seed: no group
    exp_show = [{"rev": "workspace", "name": None, "data": revs[0]["data"], "experiments": None},
                {**revs[0], "experiments": [{"name": r["name"], "revs": [r]} for r in revs[1:]]}]
    rows = experiment_rows(exp_show, ["prediction", "schedule"])
    text = render(rows, "prediction", "schedule", [])
    seeds = text.split("## Across seeds")[1]
    # the workspace repeats HEAD's run, which counts once: eps has seeds 0, 1, 2, best FIDs 30, 34, 32
    eps = next(line for line in seeds.splitlines() if line.startswith("| prediction=eps"))
    assert eps.startswith("| prediction=eps | 0,1,2 | 32.00 ± 2.00 | 32.00 ± 2.00 | 40.00 ± 2.00 | 4.200 ± 0.200 |")
    v = next(line for line in seeds.splitlines() if line.startswith("| prediction=v"))
    # v: best 20 and 21 → 20.50 ± 0.71; ddim-20 20, 22 → 21.00 ± 1.41; ddpm-20 25, 21 → 23.00 ± 2.83; bpd 3.1 ± 0.141
    assert v == "| prediction=v | 0,1 | 20.50 ± 0.71 | 21.00 ± 1.41 | 23.00 ± 2.83 | 3.100 ± 0.141 |"
    assert "prediction=x0" not in seeds  # a single seed is no spread
    assert seeds.index("prediction=v") < seeds.index("prediction=eps")  # sorted by mean best FID
