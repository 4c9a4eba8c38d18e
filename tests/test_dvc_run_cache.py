"""Every stage that does work can be restored from DVC's run-cache, so that a queued
experiment (`dvc exp run --queue`, which runs in a fresh temporary workspace) or a return to
earlier params skips the stages whose inputs it has seen before: a σ_rel or guidance sweep
of the CPU preset never retrains, and an ablation never retrains the FID classifier.

DVC 3 saves a stage's run to the run-cache only when none of its plain ``outs`` is
``cache: false`` (``Stage.run``: ``run_cache=not no_cache_outs``; metrics and plots may be
uncached) and none is ``persist`` (``dvc.stage.cache._can_hash``). The stages are read as
DVC reads them, matrix cells expanded."""

from pathlib import Path

from dvc.repo import Repo

REPO = Path(__file__).resolve().parents[1]
# check always runs (always_changed: it validates params and data before anything is
# deleted) and log always runs (it logs the pipeline run to MLflow): neither does model work
ALWAYS_RUN = {"check", "log"}


def test_every_stage_that_does_work_can_be_restored_from_the_run_cache():
    with Repo(str(REPO)) as repo:
        stages = {s.addressing: s for s in repo.index.stages}
    assert {"classifier", "train", "report"} <= set(stages) and any(a.startswith("fid@") for a in stages)
    for address, stage in stages.items():
        if address.split("@")[0] in ALWAYS_RUN:
            assert stage.always_changed, address
            continue
        assert not stage.always_changed, address
        uncached = [str(o) for o in stage.outs if not o.use_cache and not (o.is_metric or o.is_plot)]
        persistent = [str(o) for o in stage.outs if o.persist]
        assert not uncached and not persistent, (address, uncached, persistent)
