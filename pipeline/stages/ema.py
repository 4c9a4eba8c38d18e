"""Stage `ema`: the checkpoint that `sample`, `nll` and `denoise` use, holding the average
of the weights that ``ema.sigma_rel`` names:

- ``null``: train's own EMA (``train.ema``), unchanged;
- a number σ_rel: EDM2's post-hoc EMA (Karras et al. 2024, sec. 3.2): the power-function
  EMA of relative width σ_rel at the last training step, synthesised by least squares
  from the snapshots of the power EMAs of ``train.ema_profiles`` (``ddpm.posthoc_ema``).

Writes ``--out`` (train's checkpoint with ``ema`` and ``ema_config`` replaced; the raw
weights stay) and ``--metrics``: which average it is (``average.source`` train or posthoc,
``average.kind``, ``average.sigma_rel`` when it is a power EMA, …) and, for a post-hoc one,
the relative error of the least-squares fit of its profile (``average.fit_error``). A checkpoint
whose raw or averaged weights do not fit its stored config (or snapshots that do not), or hold NaN
or ∞ (as the post-hoc average may), is refused before anything is written, as `sample` refuses it.
Changing ``ema.sigma_rel`` re-runs this stage and those after it, never `train`.
The snapshots are read one at a time.
"""

from pathlib import Path

import torch
import typer

from ddpm.checkpoint import CheckpointError, check_finite, load_checkpoint, load_snapshot
from ddpm.errors import InputError
from ddpm.files import atomic_save
from ddpm.model import check_model_checkpoint, weights_mismatch
from ddpm.posthoc_ema import reconstruct, solve
from pipeline.outputs import read_json, write_metrics
from pipeline.params import base, ema
from pipeline.stages._cli import PARAMS, stage, stage_app

KEYS = ["ema"]

app = stage_app()


def read_index(snapshots: Path, ckpt: dict, checkpoint: Path) -> dict:
    """train's ``index.json`` of the snapshots, checked against the checkpoint."""
    index = read_json(snapshots / "index.json")
    if not index.get("steps"):
        raise InputError(f"{snapshots} holds no EMA snapshots: train with train.ema_profiles and "
                         "train.ema_snapshot_every > 0, or set ema.sigma_rel: null")
    if index.get("fingerprint") != ckpt["config"].get("fingerprint"):
        raise CheckpointError(f"the EMA snapshots in {snapshots} are from another training run than {checkpoint}")
    if max(index["steps"]) > ckpt["step"]:
        raise CheckpointError(f"{snapshots} has snapshots after step {ckpt['step']} of {checkpoint}")
    return index


def snapshot_weights(snapshots: Path, index: dict, coefficients: list[float]):
    """(weights, coefficient) per profile of every snapshot file, loading one file at a time."""
    sigma_rels = index["sigma_rels"]
    for i, (step, name) in enumerate(zip(index["steps"], index["files"])):
        snap = load_snapshot(snapshots / name)
        if snap["step"] != step or snap["sigma_rels"] != sigma_rels \
                or snap["config"].get("fingerprint") != index["fingerprint"]:
            raise CheckpointError(f"EMA snapshot {snapshots / name} does not match {snapshots / 'index.json'}")
        for j, weights in enumerate(snap["weights"]):
            yield weights, coefficients[j * len(index["steps"]) + i]


def posthoc(ckpt: dict, checkpoint: Path, snapshots: Path, sigma_rel: float, expected: dict) -> tuple:
    """(averaged weights in the checkpoint's ``ema`` layout, ``ema_config``, the metrics' summary) of the
    post-hoc power EMA of ``sigma_rel`` from the snapshots, checked against the network's ``expected``
    state dict."""
    index = read_index(snapshots, ckpt, checkpoint)
    steps, sigma_rels = index["steps"], index["sigma_rels"]
    # inputs ordered profile by profile: (σ_0, every step), (σ_1, every step), …
    x, error = solve(steps * len(sigma_rels), [s for s in sigma_rels for _ in steps], ckpt["step"], sigma_rel)
    weights = reconstruct(snapshot_weights(snapshots, index, x.tolist()))
    mismatch = weights_mismatch(expected, weights)
    if mismatch:
        raise CheckpointError(f"the EMA snapshots in {snapshots} do not match the config of {checkpoint} ({mismatch})")
    check_finite(weights, f"the post-hoc EMA weights (σ_rel {sigma_rel}) from the snapshots in {snapshots}")
    averaged = {f"module.{k}": v for k, v in weights.items()} | {"n_averaged": torch.tensor(ckpt["step"])}
    config = {"source": "posthoc", "kind": "power", "sigma_rel": sigma_rel, "profiles": sigma_rels,
              "snapshot_steps": steps, "coefficients": x.tolist(), "fit_error": error}
    summary = {"source": "posthoc", "kind": "power", "sigma_rel": sigma_rel, "fit_error": round(error, 6),
               "snapshots": len(steps) * len(sigma_rels)}
    return averaged, config, summary


@app.command()
@stage
def main(params: Path = PARAMS, checkpoint: Path = typer.Option(Path("models/model.pt"), help="train's checkpoint"),
         snapshots: Path = typer.Option(Path("models/ema_snapshots"), help="train's EMA snapshots"),
         out: Path = typer.Option(Path("models/model_ema.pt"), help="checkpoint for sample, nll and denoise"),
         metrics: Path = typer.Option(Path("metrics/ema.json"), help="which average, and the fit of a post-hoc one")):
    """Choose the average of the weights (ema.sigma_rel): train's own EMA, or EDM2's post-hoc EMA."""
    p = base.load(params, "ema", KEYS, ema).ema
    ckpt = load_checkpoint(checkpoint)
    if "ema" not in ckpt:
        raise CheckpointError(f"checkpoint {checkpoint} holds no averaged weights ('ema')")
    net, _ = check_model_checkpoint(ckpt, checkpoint)  # its raw and averaged weights fit its stored config
    config = ckpt.get("ema_config", {"source": "train"})
    summary = {"sigma_rel": None, **{k: v for k, v in config.items() if v is None or isinstance(v, (str, int, float))}}
    if p.sigma_rel is not None:
        ckpt["ema"], config, summary = posthoc(ckpt, checkpoint, snapshots, p.sigma_rel, net.state_dict())
        print(f"ema: post-hoc σ_rel {p.sigma_rel} from {len(config['snapshot_steps'])} snapshots × σ_rel "
              f"{config['profiles']} (profile fit error {config['fit_error']:.2%})")
    else:
        print(f"ema: train's own EMA ({', '.join(f'{k} {v}' for k, v in config.items() if k != 'source')})")
    ckpt["ema_config"] = config
    atomic_save(ckpt, out)
    write_metrics(metrics, {"average": {**summary, "step": ckpt["step"]}})
    print(f"ema: → {out}, {metrics}")


if __name__ == "__main__":
    app()
