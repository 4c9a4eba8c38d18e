"""Shared fixtures (tiny data sets written in the real file formats, tiny params, built by
``helpers``) and the plumbing that lets the suite run in parallel.

How the suite runs (``make test`` = CI; ``make test-fast`` = the loop while editing):

- ``make test`` runs every test on pytest-xdist workers (``-n 2 --dist loadfile``, one per
  core) and prints the 25 slowest. ``make test-fast`` leaves out the tests marked ``slow``.
- Markers (registered in pyproject.toml): ``slow`` for a test that runs stage subprocesses,
  DVC, torchrun or an MLflow server, or trains for hundreds of steps (seconds to minutes
  each); ``e2e`` for the ones that run the whole pipeline through ``dvc repro``/``dvc exp
  run`` (also ``slow``). Mark a new test ``slow`` when it needs more than ~3 s or a
  subprocess; everything else is in the fast loop.
- ``--dist loadfile``: every test file runs whole on one worker, in file order. So a
  ``scope="module"`` fixture (a trained workspace, a reproduced DVC repository, a running
  MLflow server) is built once per run, and tests that continue from each other's state
  would see it (none do now: each end-to-end test copies ``reproduced``). To share something
  expensive within a file, give it a module-scoped fixture; across files, a
  ``scope="session"`` fixture here (each worker that needs it builds it once) or, for one
  copy per run, ``helpers.build_once``. (``--dist loadgroup`` would spread a file's independent tests further, but
  pytest-xdist 3.8's groups do not reach pytest 9.2's node ids: every test was scheduled
  alone.)
- Work is handed out in collection order, which ``pytest_collection_modifyitems`` below
  sorts: the longest files (``FIRST``), the other files with ``e2e`` tests, those with other
  ``slow`` tests, then the rest (with ``--no-loadscope-reorder``, which the Makefile
  passes), so that the longest chains start at once and the short files fill in around them.
- Built once per test run for all workers: ``helpers.build_once`` (a file lock in the run's
  shared temporary folder). The session fixture ``reproduced`` uses it: a tiny DVC
  repository after `dvc repro`, which tests copy (``helpers.copy_repository``) to run DVC in.
- Tests must not share a port, a server or a folder across workers: use ``tmp_path`` /
  ``tmp_path_factory`` (one base folder per worker) and free ports (``test_tracking.closed_port``).
  Several processes creating one fresh ``mlflow.db`` at once can crash: give each test its own.
- On a worker, torch uses one intra-op thread and stage subprocesses inherit
  ``OMP_NUM_THREADS=1``: two workers on two cores, not four threads fighting for them.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from helpers import build_once, build_reproduced, make_idx_dir, tiny_params

# train logs live to MLflow unless told not to; a fresh sqlite database per test workspace costs
# seconds, so the tests that are not about MLflow train without it (test_live and test_e2e turn it on)
os.environ["PIPELINE_LIVE_MLFLOW"] = "0"

# torch.compile's kernels in a cache of this test run (as CI's fresh machine has): a cache another run left
# (of another CPU capability: ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA) is never read
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # set here, in pytest's first process; its workers inherit it
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="torchinductor-tests-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)

if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core: no oversubscription
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    torch.set_num_threads(1)


# The longest files, measured (docs/guides/contributing.md), handed out first and in this order. test_study
# (a tiny study through DVC's queue, in a copy of ``reproduced``, which it builds first) and test_performance
# (gpu-check's dry run: no DVC repository) start at once, one on each worker; then test_slurm (studies on a real
# SLURM cluster, in a copy of ``reproduced``: built by then), test_e2e and test_e2e_sweeps follow.
FIRST = ("tests/test_study.py", "tests/test_performance.py", "tests/test_slurm.py", "tests/test_e2e.py",
         "tests/test_e2e_sweeps.py")


def pytest_collection_modifyitems(config, items):
    """FIRST, then files with e2e tests, then files with slow tests (most slow tests first),
    then the rest; a file's tests stay together and in their order (--dist loadfile hands out
    files in this order)."""
    def file_of(item) -> str:
        return item.nodeid.split("::")[0]

    rank: dict[str, tuple[int, int, int]] = {}
    for i, item in enumerate(items):
        e2e, slow = item.get_closest_marker("e2e") is not None, item.get_closest_marker("slow") is not None
        level, slow_tests, first = rank.get(file_of(item), (3, 0, i))
        rank[file_of(item)] = (min(level, 1 if e2e else 2 if slow else 3), slow_tests - slow, first)
    for path, (level, slow_tests, first) in rank.items():
        if path in FIRST:
            rank[path] = (0, FIRST.index(path), first)
    items.sort(key=lambda item: rank[file_of(item)])


# ----------------------------------------------------------------------------- the "figures" summary
@pytest.fixture
def figure(request):
    """``figure("text")`` adds a line to the "figures" section of the test summary (counts a
    test measured, e.g. how many bad inputs it tried). Carried in the test's report, so it
    reaches the summary from an xdist worker too."""
    return lambda line: request.node.user_properties.append(("figure", line))


FIGURES: list[str] = []


def pytest_runtest_logreport(report):
    if report.when == "call":
        FIGURES.extend(value for key, value in report.user_properties if key == "figure")


def pytest_terminal_summary(terminalreporter):
    """The CPU the durations were measured on (a test suite's time is as much the CPU's as the tests'), and
    the figures the tests recorded."""
    imitated = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}
    terminalreporter.write_line(f"cpu: {torch.backends.cpu.get_cpu_capability()} (torch's kernels), "
                                f"{os.cpu_count()} cores" + (f", imitated by {imitated}" if imitated else ""))
    if FIGURES:
        terminalreporter.section("figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module of tiny tensors: faster than several, and far
    faster on a shared, loaded machine (and like the stage subprocesses). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory) -> Path:
    return make_idx_dir(tmp_path_factory.mktemp("idx"))


@pytest.fixture
def params_file(tmp_path, idx_dir) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(idx_dir)))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A workspace with a trained tiny model (models/model.pt, its snapshots,
    models/model_ema.pt), made by the `train` and `ema` commands: once per test module, whose
    tests may write into it (each module has its own)."""
    from tiny import cli, workspace  # the CLI's imports, only for the modules that use it

    torch.set_num_threads(1)
    root = workspace(tmp_path_factory.mktemp("trained"), steps=2)
    assert cli(root, "train", "--device", "cpu").exit_code == 0
    assert cli(root, "ema").exit_code == 0
    return root


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> Path:
    """A tiny DVC repository after `dvc repro` (``helpers.build_reproduced``: the repository's
    files, ``e2e_params``, committed as "baseline", MLflow in its mlflow.db), built once per
    test run for all xdist workers. Read-only: a test that runs DVC in it takes its own copy,
    ``helpers.copy_repository(reproduced, tmp_path / "repo")`` (a fraction of a second)."""
    return build_once(tmp_path_factory, "reproduced", build_reproduced) / "repo"
