"""DDP through torchrun on 2 CPU processes (gloo) equals one process with the same
global batch: training to float tolerance, sharded sampling exactly."""

import json

import pytest
import torch
import yaml
from tiny import cli, max_abs_diff, run, weights, workspace  # noqa: F401

from ddpm.distributed import SINGLE, World, derive_seed

pytestmark = pytest.mark.usefixtures("one_thread")

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pipeline")
SAMPLE = ("sample", "--sampler", "ddpm", "--steps", "3", "--device", "cpu", "--checkpoint", "models/single.pt")


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    root = workspace(tmp_path, steps=6, batch_size=8, checkpoint_every=0, augment="hflip")
    single = cli(root, "train", "--device", "cpu", "--out", "models/single.pt", "--metrics", "metrics/single.json")
    assert single.exit_code == 0, single.output
    ddp = run(root, *TORCHRUN, "train", "--device", "cpu", "--out", "models/ddp.pt", "--metrics", "metrics/ddp.json")
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    assert "(2 processes)" in ddp.stdout and ddp.stdout.count("train: 6 steps") == 1  # rank 0 prints

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
