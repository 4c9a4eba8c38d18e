"""What an edit re-runs (``pipeline.experiments.deps``), read from dvc.yaml and params.yaml as DVC
expands them: the diffusion model's files never reach the FID ruler or the data, a command that is
no stage reaches no stage, and a random line's edit re-runs at most a quarter of the stage runs.
The figures these targets guard were measured on d83803e: 0.489 line-weighted, 51 of 51 stage
runs for 23 of the 27 library files and for pipeline/cli.py."""

import pytest

from helpers import REPO
from pipeline.experiments import deps

# the files of the diffusion model (ddpm/): an edit of any re-runs none of RULER
DIFFUSION_MODEL = ("unet", "diffusion", "samplers", "training", "ema", "posthoc_ema", "guidance", "likelihood",
                   "objectives", "predictions", "variance", "schedules", "timestep_sampling")
RULER = ("prepare", "classifier", "fid_ref", "fid_floor")  # the data and the FID ruler
MAX_SHARE = 0.25


@pytest.fixture(scope="module")
def costs():
    costs, total = deps.blast_radius(REPO)
    return {c.path: c for c in costs}, total


@pytest.mark.parametrize("name", DIFFUSION_MODEL)
def test_an_edit_of_the_diffusion_model_never_moves_the_ruler(costs, name):
    path = f"ddpm/{name}.py"
    assert (REPO / path).is_file(), f"{path} was moved: update DIFFUSION_MODEL"
    assert not set(costs[0][path].stages) & set(RULER), (path, costs[0][path].stages)


def test_an_edit_of_a_command_that_is_no_stage_reruns_no_stage(costs):
    from pipeline import cli

    modules = [m for name, (m, _) in cli.COMMANDS.items() if name not in cli.STAGES]
    assert {"pipeline.experiments.study_commands", "pipeline.commands.export", "pipeline.experiments.compare",
            "pipeline.experiments.exp_run"} <= set(modules)
    files = ["pipeline/cli.py", "pipeline/__main__.py"] + [deps.module_file(REPO, m).relative_to(REPO).as_posix()
                                                           for m in modules]
    rerun = {f: costs[0][f].stages for f in files if costs[0][f].runs}
    assert not rerun, rerun


def test_a_random_line_edit_reruns_at_most_a_quarter_of_the_pipeline(costs, figure):
    by_path, total = costs
    weighted, mean = deps.shares(list(by_path.values()), total)
    figure(f"edit cost: {weighted:.3f} of {total} stage runs line-weighted (target ≤ {MAX_SHARE}; 0.489 on d83803e), "
           f"mean over {len(by_path)} files {mean:.3f}")
    assert weighted <= MAX_SHARE


def test_the_deps_command_prints_the_table():
    from typer.testing import CliRunner

    from pipeline.cli import app

    r = CliRunner().invoke(app, ["deps"])
    assert r.exit_code == 0, r.output
    assert "| `ddpm/unet.py` |" in r.output and "Line-weighted share" in r.output
