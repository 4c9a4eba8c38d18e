"""What users see (issue 24): the DVC metrics files hold named numbers, not per-timestep or
per-cell detail, under names `dvc exp show` lists without file prefixes, the best FID first;
the report's header and its FID figure (samplers with identical cells are one line, marked
so), no guidance labels without guidance; the learning rate from step 1; the git branch of a
DVC experiment. (The MLflow side of the `log` stage: tests/test_cli.py; the plots page:
tests/test_plots_page.py.)"""

import json
import re
import subprocess
from pathlib import Path

import matplotlib.axes
import pytest
import torch
import yaml
from tiny import cli, workspace

from ddpm.training import TrainConfig, init_state
from ddpm.training import learning_rate as lr_of_step
from pipeline.experiments.compare import experiment_rows
from pipeline.experiments.exp_run import experiment_name
from pipeline.params.base import flatten
from pipeline.rendering import figures
from pipeline.stages import report
from pipeline.stages.train import loss_rows, lr_rows

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
CELLS = [("ddim", 3), ("euler", 3), ("ddpm", 3)]  # ddim (η = 0) and euler: the same images


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Every stage that writes a DVC metrics file, on 8×8 data: classifier, train, ema, the cells,
    fid-ref, fid-floor, nll, denoise, report."""
    root = workspace(tmp_path_factory.mktemp("views"))
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["sample"].update(samplers=[s for s, _ in CELLS], steps=[3])
    (root / "params.yaml").write_text(yaml.safe_dump(p))
    steps = [["classifier", "--device", "cpu"], ["train", "--device", "cpu"], ["ema"], ["fid-ref"], ["fid-floor"],
             ["nll", "--device", "cpu"], ["denoise", "--device", "cpu"]]
    for s, k in CELLS:
        steps += [["sample", "--sampler", s, "--steps", str(k), "--out", f"samples/{s}-{k}", "--device", "cpu"],
                  ["fid", "--samples", f"samples/{s}-{k}/samples.pt", "--out", f"metrics/cells/{s}-{k}.json"]]
    for args in steps + [["report"]]:
        r = cli(root, *args)
        assert r.exit_code == 0, (args, r.output)
    return root


def declared_metrics() -> list[str]:
    """The metrics files of dvc.yaml, in the order `dvc exp show` shows their columns (its stages' order)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return [next(iter(m)) for stage in stages.values() for m in stage.get("metrics", [])]


def test_metrics_files_hold_named_numbers_not_per_timestep_detail(run):
    params = flatten(yaml.safe_load((run / "params.yaml").read_text()))
    columns: dict[str, str] = {}
    for path in declared_metrics():
        data = json.loads((run / path).read_text())
        assert isinstance(data, dict) and len(data) >= 1, path
        for name, value in flatten(data).items():
            # one value per column: no arrays (the per-timestep MSE is plots/denoise_by_timestep.csv)
            assert isinstance(value, (int, float, str, bool)) or value is None, (path, name, value)
            # a number in a name only as the steps of a cell, fid.<sampler>.<steps>: nothing per timestep
            if any(part.isdigit() for part in name.split(".")):
                assert re.fullmatch(r"fid\.[a-z_0-9]+\.\d+(-\w+)?", name), (path, name)
            # unique across the files and apart from every param: `dvc exp show` names it without a file prefix
            assert name not in columns and name not in params, (path, name, columns.get(name))
            columns[name] = path
    assert "denoise.ema_mse" in columns and "nll.bits_per_dim" in columns and "floor.fid" in columns
    assert not [c for c in columns if "by_timestep" in c]
    # the per-timestep MSE is a plot, one row per timestep of the grid
    rows = (run / "plots/denoise_by_timestep.csv").read_text().splitlines()
    assert rows[0] == "t,ema_mse,raw_mse,untrained_mse" and len(rows) == 1 + 8  # denoise.timesteps: 8


def test_the_best_fid_is_the_first_column_of_dvc_exp_show(run):
    assert declared_metrics()[0] == "metrics/fid.json"
    fid = json.loads((run / "metrics/fid.json").read_text())
    assert list(flatten(fid))[:3] == ["best.fid", "best.sampler", "best.steps"]
    cells = {(s, k): json.loads((run / f"metrics/cells/{s}-{k}.json").read_text())["fid"] for s, k in CELLS}
    best = min(cells, key=cells.get)
    assert fid["best"] == {"fid": cells[best], "sampler": best[0], "steps": best[1]}
    assert fid["fid"] == {s: {str(k): cells[s, k]} for s, k in CELLS}  # only the FID of each cell


def test_compare_reads_the_metrics_files_and_older_ones(run):
    def exp_show(files: dict) -> list:
        return [{"rev": "a" * 40, "name": "main", "data": {
            "params": {"params.yaml": {"data": yaml.safe_load((run / "params.yaml").read_text())}},
            "metrics": {path: {"data": data} for path, data in files.items()}}}]

    now = {path: json.loads((run / path).read_text()) for path in declared_metrics()}
    (row,) = experiment_rows(exp_show(now), ["schedule"])
    assert row["bits_per_dim"] == now["metrics/nll.json"]["nll"]["bits_per_dim"]
    assert row["classifier_accuracy"] == now["metrics/classifier.json"]["classifier"]["test_accuracy"]
    assert row["best_fid"] == now["metrics/fid.json"]["best"]["fid"] and set(row["cells"]) == {"ddim-3", "euler-3",
                                                                                                "ddpm-3"}
    # an experiment recorded before the metrics were named by block (flat files, kid/… per cell)
    old = {"metrics/fid.json": {"fid": {"ddim": {"3": 30.0}}, "kid": {"ddim": {"3": 0.01}},
                                "best": {"fid": 30.0, "sampler": "ddim", "steps": 3}},
           "metrics/nll.json": {"bits_per_dim": 4.5}, "metrics/classifier.json": {"test_accuracy": 0.9}}
    (row,) = experiment_rows(exp_show(old), ["schedule"])
    assert (row["bits_per_dim"], row["classifier_accuracy"], row["cells"]) == (4.5, 0.9, {"ddim-3": {
        "fid": 30.0, "kid": 0.01}})


def test_identical_samplers_are_one_line_marked_so(run):
    images = {s: torch.load(run / f"samples/{s}-3/samples.pt", weights_only=True)["images"] for s, _ in CELLS}
    assert (images["ddim"].int() - images["euler"].int()).abs().max() <= 1  # the same images up to rounding
    assert (images["ddim"].int() - images["ddpm"].int()).abs().max() > 1
    rows = [line.split(",") for line in (run / "plots/fid_vs_steps.csv").read_text().splitlines()]
    line = {r[0]: r[-1] for r in rows[1:]}
    assert rows[0][-1] == "line" and line == {"ddim": "ddim ≈ euler", "euler": "ddim ≈ euler", "ddpm": "ddpm"}
    md = (run / "reports/report.md").read_text()
    assert "**Same images**: ddim ≈ euler (Euler on the probability-flow ODE is DDIM with η = 0): at every step " \
           "count the same images up to rounding (no pixel more than 1 grey level apart," in md
    # samples that differ by more than rounding are lines of their own
    lines, same = report.same_lines(run / "samples", ["ddpm", "ddim"], [3])
    assert lines == {"ddpm": "ddpm", "ddim": "ddim"} and same == {}
    # the figure: one line for the two, labelled with both (the legend's labels)
    labels = []
    real = matplotlib.axes.Axes.plot

    def plot(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return real(self, *args, **kwargs)

    cells = {(s, k): json.loads((run / f"metrics/cells/{s}-{k}.json").read_text()) for s, k in CELLS}
    lines = report.same_lines(run / "samples", [s for s, _ in CELLS], [3])[0]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(matplotlib.axes.Axes, "plot", plot)
        figures.plot_fid(cells, [s for s, _ in CELLS], [3], run / "fid.png", lines)
        assert labels == ["ddim ≈ euler", "ddpm"]
        labels.clear()  # precision vs recall: one point for the two cells too
        figures.plot_sweep(report.sweep_rows(cells, {}, [s for s, _ in CELLS], [3], []), run / "sweep.png", lines)
    assert labels == ["ddim ≈ euler-3", "ddpm-3"]


def test_no_guidance_labels_without_guidance(run, tmp_path):
    cells = {(s, k): json.loads((run / f"metrics/cells/{s}-{k}.json").read_text()) for s, k in CELLS}
    rows = report.sweep_rows(cells, {}, [s for s, _ in CELLS], [3], [])
    notes = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(matplotlib.axes.Axes, "annotate", lambda self, text, *a, **k: notes.append(text))
        figures.plot_sweep(rows, tmp_path / "sweep.png")
        assert notes == []  # no "w=0" on every point
        guided = [dict(r, guidance="w1", w=1.0) for r in rows]
        figures.plot_sweep(rows + guided, tmp_path / "sweep.png")
    assert sorted(notes) == ["w=0"] * 3 + ["w=1"] * 3
    template = json.loads((REPO / ".dvc/plots/guidance_sweep.json").read_text())
    labels = template["layer"][1]["transform"]  # the DVC chart: text only where some w > 0
    assert {"filter": "datum.max_w > 0"} in labels


def test_the_report_header_says_what_ran_and_what_came_out(run):
    md, html = (run / "reports/report.md").read_text(), (run / "reports/report.html").read_text()
    nll = json.loads((run / "metrics/nll.json").read_text())["nll"]
    den = json.loads((run / "metrics/denoise.json").read_text())["denoise"]
    header = md.split("\n## ")[0]
    assert re.search(r"\*\*Run\*\*: DVC experiment workspace, git revision \S+, made \d{4}-\d\d-\d\d \d\d:\d\d UTC",
                     header)
    assert "**Params**: data.name fashion_mnist, seed 0, schedule linear, prediction eps," in header
    assert f"**Bits/dim**: {nll['bits_per_dim']:.3f} ± {nll['bits_per_dim_stderr']:.3f}" in header
    assert f"EMA weights {den['ema_mse']:.4f}, raw {den['raw_mse']:.4f}" in header
    assert "**Real-data floor**: FID" in header and "**Best**:" in header
    assert "squared feature units of the extractor" in md and "not multiplied by 1000" in md  # KID's units
    assert '<table class="summary">' in html and "<th>Bits/dim</th>" in html


def test_the_report_opens_with_the_verdict_and_marks_the_best_cell(run):
    """Issue 34: the verdict beside the best cell (its FID against the floor, the next cell), the best cell marked in
    the tables and among the grids, the grids at twice their pixels, the precision-recall figure named for what it
    shows (no guidance here)."""
    from pipeline.rendering.documents import png_width

    md, html = (run / "reports/report.md").read_text(), (run / "reports/report.html").read_text()
    fid = json.loads((run / "metrics/fid.json").read_text())["best"]
    floor = json.loads((run / "metrics/fid_floor.json").read_text())["floor"]
    best = f"{fid['sampler']}-{fid['steps']}"
    opening = md.split("\n\n")[1]
    assert opening.startswith(f"**Best: {best}.** FID {fid['fid']:.2f} = {fid['fid'] / floor['fid']:.1f}× the "
                              f"real-data floor {floor['fid']:.2f}"), opening
    assert "Next best: " in opening and "One training seed" in opening
    assert f"| {fid['sampler']} | **{fid['fid']:.2f}** |" in md and f"### {best} (best)" in md
    assert html.count('class="n best"') == md.count(" by sampler and steps (") == 5  # FID, KID, P, R, IS
    assert f'<div class="cell best"><h3>{best} (best)</h3>' in html and '<p class="verdict">' in html
    grid = png_width(run / f"samples/{best}/grid.png")
    assert f'width="{2 * grid}"' in html
    assert (run / "reports/precision_recall.png").is_file() and not (run / "reports/guidance_sweep.png").exists()


def test_the_learning_rate_of_each_step_from_step_1():
    cfg = TrainConfig(steps=10, lr=1.0e-3, warmup_steps=4, compile="none")
    state = init_state(torch.nn.Linear(2, 2), cfg, 0, torch.device("cpu"))
    used = []
    for step in range(1, 7):  # what the optimizer's k-th update uses, as ddpm.training steps it
        used.append(state.optimizer.param_groups[0]["lr"])
        assert lr_of_step(state.scheduler, step) == pytest.approx(used[-1])
        state.optimizer.step()
        state.scheduler.step()
    assert used == pytest.approx([2.5e-4, 5.0e-4, 7.5e-4, 1.0e-3, 1.0e-3, 1.0e-3])
    # the CSVs: the loss curve at the logged steps, the learning rate at every recorded step
    history = [(1, 2.5e-4, None), (2, 5.0e-4, 1.5), (3, 7.5e-4, None), (4, 1e-3, 1.2)]
    assert loss_rows([(2, 0.9), (4, 0.5)], history) == [(2, 0.9, 5.0e-4, 1.5), (4, 0.5, 1e-3, 1.2)]
    assert lr_rows(history) == [(1, 2.5e-4), (2, 5.0e-4), (3, 7.5e-4), (4, 1e-3)]


def test_the_branch_of_a_dvc_experiment(tmp_path, monkeypatch):
    """`dvc exp run` detaches HEAD at the baseline commit: the branch is the repository's at that commit."""
    from pipeline.tracking.client import git_branch, standard_tags

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q", "-b", "views")
    (tmp_path / "f").write_text("x")
    git("add", "f")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    rev = git("rev-parse", "HEAD")
    git("checkout", "-q", "--detach")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", rev)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert git_branch() == "views" and standard_tags("x")["mlflow.source.git.branch"] == "views"
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0" * 40)  # no branch there
    assert git_branch() is None


def test_an_experiment_is_named_for_what_it_changes():
    """`dvc exp show` lists params after every metric, out of sight: exp-run names a single experiment
    by its overrides, so that its first column says what changed."""
    assert experiment_name(["-S", "ema.sigma_rel=0.05"], [["ema.sigma_rel=0.05"]], set()) == "ema.sigma_rel=0.05"
    taken = {"schedule=cosine,seed=1"}
    assert experiment_name([], [["schedule=cosine", "seed=1"]], taken) == "schedule=cosine,seed=1-2"
    assert experiment_name([], [["sample.steps=[10, 20]"]], set()) == "sample.steps=10,20"  # what git takes in a ref
    for args, runs in ((["-n", "mine"], [["seed=1"]]), (["--name=mine"], [["seed=1"]]), ([], [["seed=0"], ["seed=1"]]),
                       ([], [[]]), ([], None), ([], [["data.root=/srv/a..b"]]), ([], [[f"seed={'1' * 80}"]])):
        assert experiment_name(args, runs, set()) is None, (args, runs)  # DVC names these
