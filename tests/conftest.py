"""Shared fixtures (tiny data sets written in the real file formats, tiny params, built by
``helpers``) and the plumbing that lets the suite run in parallel.

How the suite runs (``make test`` = CI; ``make test-fast`` = the loop while editing):

- ``make test`` runs every test on pytest-xdist workers (``-n 2 --dist loadgroup``, one per
  core) and prints the 25 slowest. ``make test-fast`` leaves out the tests marked ``slow``.
- Markers (registered in pyproject.toml): ``slow`` for a test that runs stage subprocesses,
  DVC, torchrun or an MLflow server, or trains for hundreds of steps (seconds to minutes
  each); ``e2e`` for the ones that run the whole pipeline through ``dvc repro``/``dvc exp
  run`` (also ``slow``). Mark a new test ``slow`` when it needs more than ~3 s or a
  subprocess; everything else is in the fast loop.
- Each xdist worker is its own process, so a ``scope="module"`` or ``"session"`` fixture is
  built once per worker that runs a test needing it. ``pytest_collection_modifyitems`` below
  keeps every test that uses a module-scoped fixture (other than the cheap ones in
  ``CHEAP_SHARED``) on the worker of its module (an ``xdist_group`` named after the module),
  so an expensive module fixture (a trained workspace, a reproduced DVC repository, a
  running MLflow server) is built once per run. A new test file gets this by using a
  module-scoped fixture; no marker is needed. Tests that run in order on one shared state
  (tests/test_e2e.py) rely on it too.
- Collection order is the order work is handed out: the ``e2e`` tests first, then the other
  ``slow`` ones, then the rest, so that the longest chains start at once and the many short
  tests fill in around them (with ``--no-loadscope-reorder``, which the Makefile passes).
- Tests must not share a port, a server or a folder across workers: use ``tmp_path`` /
  ``tmp_path_factory`` (one base folder per worker) and free ports (``test_tracking.closed_port``).
  Several processes creating one fresh ``mlflow.db`` at once can crash: give each test its own.
- On a worker, torch uses one intra-op thread and stage subprocesses inherit
  ``OMP_NUM_THREADS=1``: two workers on two cores, not four threads fighting for them.
"""

import os
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_idx_dir, tiny_params

# train logs live to MLflow unless told not to; a fresh sqlite database per test workspace costs
# seconds, so the tests that are not about MLflow train without it (test_live and test_e2e turn it on)
os.environ["PIPELINE_LIVE_MLFLOW"] = "0"

if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core: no oversubscription
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    torch.set_num_threads(1)

# module-scoped fixtures cheap enough to build on every worker (no reason to keep a module together):
# the thread setting, and the float64 Diffusion tables of the math modules (milliseconds)
CHEAP_SHARED = {"one_thread", "d"}


def _order(item) -> int:
    if item.get_closest_marker("e2e"):
        return 0
    if item.get_closest_marker("slow"):
        return 1
    return 2


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None or item.get_closest_marker("xdist_group"):
            continue
        shared = [name for name, defs in info.name2fixturedefs.items()
                  if name not in CHEAP_SHARED and defs and defs[-1].scope in ("module", "class", "package")]
        if shared:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    items.sort(key=_order)  # stable: within a class, collection order


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
