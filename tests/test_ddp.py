"""DDP through torchrun on 2 CPU processes (gloo) equals one process with the same
global batch: training to float tolerance, sharded sampling exactly."""

import json
import subprocess
import sys
import time

import pytest
import torch
import yaml
from tiny import cli, max_abs_diff, python, run, subprocess_env, weights, workspace  # noqa: F401

from ddpm.distributed import SINGLE, World, derive_seed

pytestmark = pytest.mark.usefixtures("one_thread")

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pipeline")
SAMPLE = ("sample", "--sampler", "ddpm", "--steps", "3", "--device", "cpu", "--checkpoint", "models/single.pt")


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    root = workspace(tmp_path, steps=6, batch_size=8, checkpoint_every=0, augment="hflip")
    single = cli(root, "train", "--device", "cpu", "--out", "models/single.pt", "--metrics", "metrics/single.json")
    assert single.exit_code == 0, single.output
    # the stage launches itself (DDPM_PROCESSES=2: two gloo processes on a CPU), as with every GPU of a node
    ddp = subprocess.run(python("-m", "pipeline.stages.train", "--device", "cpu", "--out", "models/ddp.pt",
                                "--metrics", "metrics/ddp.json"), cwd=root, env=subprocess_env(DDPM_PROCESSES="2"),
                         capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    assert "launch: 2 processes" in ddp.stdout and "(2 processes)" in ddp.stdout
    assert ddp.stdout.count("train: 6 steps") == 1  # rank 0 prints

    diff = max_abs_diff(weights(root / "models/single.pt"), weights(root / "models/ddp.pt"))
    print(f"DDP (2 × gloo, batch 4 each) vs 1 process (batch 8), 6 steps: max |Δw| = {diff:.2e}")
    # lr is 2e-4, so one AdamW step moves a weight by up to ~2e-4; float summation order alone
    # (gradient all-reduce, fused attention) stays below half of one step
    assert diff < 1e-4
    a, b = (json.loads((root / f"metrics/{n}.json").read_text())["train"] for n in ("single", "ddp"))
    assert a["final_step"] == b["final_step"] == 6 and a["final_loss"] == pytest.approx(b["final_loss"], abs=1e-5)

    # sharded sampling: batches spread over the ranks, each with its own seed, gathered on rank 0
    assert cli(root, *SAMPLE, "--out", "cells/single").exit_code == 0
    sharded = run(root, *TORCHRUN, *SAMPLE, "--out", "cells/ddp")
    assert sharded.returncode == 0, sharded.stdout + sharded.stderr
    one, two = (torch.load(root / f"cells/{n}/samples.pt", weights_only=True)["images"] for n in ("single", "ddp"))
    assert one.shape == (24, 1, 8, 8) and torch.equal(one, two)


def test_global_batch_shards():
    assert SINGLE.shard(8) == slice(0, 8)
    assert [World(r, 4).shard(8) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    with pytest.raises(ValueError, match="not divisible"):
        World(1, 3).shard(8)
    assert len({derive_seed(s, i) for s in range(3) for i in range(3)}) == 9


@pytest.mark.slow
def test_class_conditional_ddp_matches_one_process(tmp_path):
    """conditioning: class under DDP: the null-label drops come from the shared generator with the global
    batch, so 2 ranks train the same weights; guided sampling (labels per global image) shards exactly."""
    root = workspace(tmp_path, steps=6, batch_size=8, checkpoint_every=0)
    p = yaml.safe_load((root / "params.yaml").read_text())
    p.update(conditioning="class", cond_drop=0.5)
    (root / "params.yaml").write_text(yaml.safe_dump(p))
    single = cli(root, "train", "--device", "cpu", "--out", "models/single.pt", "--metrics", "metrics/single.json")
    assert single.exit_code == 0, single.output
    ddp = run(root, *TORCHRUN, "train", "--device", "cpu", "--out", "models/ddp.pt", "--metrics", "metrics/ddp.json")
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    a, b = weights(root / "models/single.pt"), weights(root / "models/ddp.pt")
    assert "model.label_emb.weight" in a and max_abs_diff(a, b) < 1e-4  # as above: half an AdamW step

    guided = (*SAMPLE, "--guidance", "w3")
    assert cli(root, *guided, "--out", "cells/single").exit_code == 0
    sharded = run(root, *TORCHRUN, *guided, "--out", "cells/ddp")
    assert sharded.returncode == 0, sharded.stdout + sharded.stderr
    one, two = (torch.load(root / f"cells/{n}/samples.pt", weights_only=True) for n in ("single", "ddp"))
    assert torch.equal(one["images"], two["images"]) and torch.equal(one["labels"], two["labels"])
    assert torch.equal(one["labels"], torch.arange(24) % 10)


def test_gpus_are_split_into_shares_and_processes_follow_them(monkeypatch):
    from pipeline import launch

    eight = [str(i) for i in range(8)]
    assert launch.shares(eight, 2) == [eight[:4], eight[4:]]
    assert launch.shares(eight[:5], 2) == [["0", "1", "2"], ["3", "4"]]
    assert launch.shares(["0"], 4) == [["0"]] and launch.shares([], 3) == [[]]
    monkeypatch.delenv("DDPM_PROCESSES", raising=False)
    assert launch.processes("auto", eight[:4]) == 4 and launch.processes("cuda", eight[:2]) == 2
    assert launch.processes("cuda:1", eight) == 1 and launch.processes("cpu", eight) == 1
    assert launch.processes("auto", []) == 1  # a CPU machine
    monkeypatch.setenv("DDPM_PROCESSES", "3")
    assert launch.processes("auto", eight) == 3 and launch.processes("cpu", []) == 3
    monkeypatch.setenv("DDPM_PROCESSES", "0")
    with pytest.raises(ValueError, match="DDPM_PROCESSES must be at least 1"):
        launch.processes("auto", eight)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert launch.visible_gpus() == ["2", "5"]


CLAIM = """
import sys, time
from pathlib import Path
from pipeline import launch
k, share = launch.claim_share(Path(sys.argv[1]), [str(i) for i in range(4)], 2, poll=0.1)
print(k, ",".join(share), time.monotonic(), flush=True)
time.sleep(float(sys.argv[2]))
"""


@pytest.mark.slow
def test_concurrent_experiments_get_disjoint_gpu_shares(tmp_path):
    """Three stage processes, two shares of four (simulated) GPUs: the first two hold disjoint shares, the
    third waits until one of them exits, then gets its share."""
    def start(hold: float):
        return subprocess.Popen([sys.executable, "-c", CLAIM, str(tmp_path), str(hold)], env=subprocess_env(),
                                stdout=subprocess.PIPE, text=True)

    first, second = start(1.5), start(1.5)
    time.sleep(0.5)
    third = start(0.0)
    (a, b, c) = (p.communicate(timeout=60)[0].split() for p in (first, second, third))
    assert {a[1], b[1]} == {"0,1", "2,3"}, (a, b)
    assert c[1] in ("0,1", "2,3") and float(c[2]) >= min(float(a[2]), float(b[2])) + 1.0, (a, b, c)
