"""Shared fixtures: tiny data sets written in the real file formats, tiny params (built by
``helpers``)."""

import os
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_idx_dir, tiny_params

# train logs live to MLflow unless told not to; a fresh sqlite database per test workspace costs
# seconds, so the tests that are not about MLflow train without it (test_live and test_e2e turn it on)
os.environ["PIPELINE_LIVE_MLFLOW"] = "0"

FIGURES: list[str] = []


@pytest.fixture(scope="session")
def figure():
    """``figure("text")`` adds a line to the "figures" section of the test summary (counts a
    test measured, e.g. how many bad inputs it tried)."""
    return FIGURES.append


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


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
