"""Stage `report`: gather the per-cell metrics into the experiment's metrics file and report.

``metrics/fid.json`` holds what `dvc exp show` lists: ``best.fid``, ``best.sampler`` and
``best.steps`` (the best cell, first, so that a plain ``dvc exp show`` shows it) and one FID
per cell, ``fid.<sampler>.<steps>`` (a guided cell: ``fid.<sampler>.<steps>-<guidance>``). The
rest of each cell (KID, precision, recall, Inception Score, class accuracy) stays in the
cells' own files (``metrics/cells/``, not DVC metrics) and goes to the plots: FID vs steps
(``plots/fid_vs_steps.csv`` for `dvc plots`, one line per sampler, and PNG) with every
metric of every cell, the guidance sweep.

The report, in markdown and HTML: a header saying what was run (the DVC experiment, the git
revision, the date, the key params) and what came out (the best cell and, beside it, a verdict:
its FID against the real-data floor and the margin to the next cell; the floor itself,
bits/dim from `nll`, the denoising MSE from `denoise`, the extractor's test accuracy, which
weights the cells sampled), the FID table (rows = sampler, columns = steps, as in the DDIM
paper's Table 1), KID / precision / recall / Inception Score tables with their units, the
figures, and per cell the sample grid and the denoising strip, the best cell marked in the
tables and among the grids (shown at twice their size). Samplers whose samples are the
same images up to rounding at every step count (no pixel more than one grey level apart:
DDIM with η = 0 and Euler, one ODE step rule written twice) are one line of the FID figure,
labelled ``ddim ≈ euler``, and so in the CSV's ``line`` column, which the DVC template colours
by; the header says how many pixels differ.

It also states which weights the cells sampled (``sample.weights``, from each cell's
``info.json``) and which average they are (``metrics/ema.json`` of the `ema` stage), and
writes ``plots/fid_vs_sigma_rel.csv`` (sampler, steps, σ_rel, FID): one point per cell at
this experiment's σ_rel; ``dvc plots diff`` over the experiments of a σ_rel sweep joins
them into FID-vs-σ_rel lines (EDM2 Fig. 1), as does ``python -m pipeline compare --sigma-rel-figure``.
For a class-conditional model also the class accuracy of every cell, and the guidance
sweep: one row per cell and guidance setting (the plain cell is w = 0; the others come
from sample.guidance) with FID, class accuracy, precision and recall, as a table, a CSV
for `dvc plots` (precision vs recall, one point per w) and a PNG (FID vs class accuracy
and precision vs recall: the trade-off curves of Ho & Salimans 2022, fig. 4). Its sample
grids show one row per class. Without guidance the precision-vs-recall figure has one
point per cell and no w labels; either way it is ``reports/precision_recall.png``.

The markdown links images relative to itself; the HTML embeds them (base64), so it
opens anywhere as one file (also in MLflow's artifact viewer, which shows no markdown images).
"""

import time
from pathlib import Path

import typer

from ddpm.errors import InputError
from ddpm.pixels import differing_share
from pipeline.outputs import check_writable, read_json, read_losses, write_atomic, write_csv, write_metrics
from pipeline.params import base, data, diffusion, fid, model, sample, train
from pipeline.rendering import figures as figures_
from pipeline.rendering.documents import render
from pipeline.stages._cli import PARAMS, stage, stage_app
from pipeline.workspace import experiment_name, git_revision

# the matrix, and the params the report's header shows
KEYS = ["sample.samplers", "sample.steps", "sample.guidance", "data.name", "seed", "schedule", "prediction",
        "timesteps", "loss", "variance", "conditioning", "model.ch", "model.ch_mult", "model.num_res_blocks",
        "train.steps", "train.batch_size", "train.lr", "sample.num_samples", "sample.spacing", "fid.extractor"]
TEMPLATES = ("report.md.j2", "report.html.j2")

app = stage_app()

# (key in a cell's metrics, table title, format, lower is better?, what the number is)
TABLES = [("fid", "FID", "{:.2f}", "lower is better",
           "Fréchet distance between Gaussians fitted to the extractor's features of the samples and of the test "
           "split, in squared feature units of that extractor: comparable only with FIDs of the same extractor and "
           "number of samples (the real-data floor above is its scale)."),
          ("kid_mean", "KID", "{:.4f}", "lower is better",
           "Kernel Inception Distance (Bińkowski et al. 2018) as torch-fidelity computes it: the unbiased squared MMD "
           "between sample and test-split features with the kernel k(x, y) = (x·y/d + 1)³, mean over 100 random "
           "subsets of fid.kid_subset_size images; in squared feature units of the extractor, as computed (not "
           "multiplied by 1000, as some papers print it); 0 for identical distributions, and it can dip below 0."),
          ("precision", "Precision", "{:.3f}", "higher is better",
           "Share of samples inside the k-NN manifold of the test-split features (Kynkäänniemi et al. 2019), 0 to 1."),
          ("recall", "Recall", "{:.3f}", "higher is better",
           "Share of test-split images inside the k-NN manifold of the samples' features, 0 to 1."),
          ("isc_mean", "Inception Score", "{:.2f}", "higher is better",
           "exp(E KL(p(y|x) ‖ p(y))) from the extractor's class probabilities: 1 to the number of classes."),
          ("class_accuracy", "Class accuracy", "{:.3f}", "higher is better",
           "Share of samples the pipeline's classifier assigns to the class they were drawn for, 0 to 1.")]
ROUNDING = 1  # grey levels: samples no further apart than this, pixel by pixel, are the same images up to rounding

# the guidance sweep's columns: (key in a cell's metrics, title, format)
SWEEP = [("fid", "FID", "{:.2f}"), ("class_accuracy", "class accuracy", "{:.3f}"),
         ("precision", "precision", "{:.3f}"), ("recall", "recall", "{:.3f}")]


def table(cells: dict, samplers: list[str], steps: list[int], key: str, fmt: str) -> list[list[str]] | None:
    """Rows = sampler, columns = steps; None when no cell has ``key``."""
    if not any(key in c for c in cells.values()):
        return None
    return [[s] + [fmt.format(cells[s, k][key]) if key in cells[s, k] else "–" for k in steps] for s in samplers]


def best_position(samplers: list[str], steps: list[int], best: tuple) -> tuple[int, int]:
    """(row, column) of the best cell in a table of ``table`` (column 0 is the sampler): the report marks it."""
    return samplers.index(best[0]), 1 + steps.index(best[1])


def same_lines(samples_dir: Path, samplers: list[str], steps: list[int]) -> tuple[dict[str, str], dict[str, float]]:
    """({sampler: the label of its line}, {label: the largest share of pixels that differ at a step count}):
    samplers whose samples (``<samples_dir>/<sampler>-<steps>/samples.pt``) are the same images up to
    rounding at every step count (no pixel more than ROUNDING grey levels apart; DDIM with η = 0 and Euler)
    share one line, labelled ``"ddim ≈ euler"``. Without the samples files every sampler is a line."""
    import torch

    loaded: dict = {}

    def images(s: str, k: int):
        if (s, k) not in loaded:
            path = samples_dir / f"{s}-{k}" / "samples.pt"
            loaded[s, k] = torch.load(path, weights_only=True)["images"] if path.is_file() else None
        return loaded[s, k]

    def apart(a: str, b: str) -> float | None:
        """The largest share of differing pixels over the step counts; None when not the same up to rounding."""
        shares = []
        for k in steps:
            x, y = images(a, k), images(b, k)
            share = None if x is None or y is None else differing_share(x, y, ROUNDING)
            if share is None:
                return None
            shares.append(share)
        return max(shares)

    groups: list[tuple[list[str], list[float]]] = []
    for s in samplers:
        for members, shares in groups:
            if (share := apart(members[0], s)) is not None:
                members.append(s)
                shares.append(share)
                break
        else:
            groups.append(([s], []))
    labels = {s: " ≈ ".join(members) for members, _ in groups for s in members}
    return labels, {" ≈ ".join(m): max(shares) for m, shares in groups if shares}


def sweep_rows(cells: dict, guided: dict, samplers: list[str], steps: list[int], guidance: list[str]) -> list[dict]:
    """One row per cell and guidance setting, w ascending: the plain cell (guidance "none", w = 0) first."""
    rows = []
    for s in samplers:
        for k in steps:
            runs = [("none", cells[s, k])] + [(g, guided[s, k, g]) for g in guidance]
            for g, c in sorted(runs, key=lambda r: (r[1].get("w", 0.0), r[0] != "none")):
                rows.append({"cell": f"{s}-{k}", "sampler": s, "steps": k, "guidance": g, "w": c.get("w", 0.0),
                             **{key: c.get(key) for key, _, _ in SWEEP}})
    return rows


def summary(doc: dict) -> list[tuple[str, str]]:
    """The header of the report, (label, text) per line: what was run and what came out."""
    run = doc["run"]
    items = [("Run", f"DVC experiment {run['experiment']}, git revision {run['revision']}, made {run['date']}"),
             ("Params", ", ".join(f"{k} {v}" for k, v in doc["params"].items())),
             ("Best", f"{doc['best'][0]}-{doc['best'][1]} ({doc['best'][0]} with {doc['best'][1]} steps): FID "
                      f"{doc['best_fid']:.2f}")]
    if doc["floor"]:
        items.append(("Real-data floor", floor_line(doc["floor"])))
    nll = doc["nll"]
    items.append(("Bits/dim", f"{nll['bits_per_dim']:.3f} ± {nll['bits_per_dim_stderr']:.3f} (standard error) on "
                              f"{nll['test_images']} test images, from the full variational bound (nll stage)"
                  if nll else "not measured (no metrics/nll.json: run the nll stage)"))
    d = doc["denoise"]
    items.append(("Denoising MSE", f"held-out ε-MSE on {d['test_images']} test images: EMA weights "
                                   f"{d['ema_mse']:.4f}, raw {d['raw_mse']:.4f} (EMA/raw {d['ema_over_raw']:.3f}), "
                                   f"untrained {d['untrained_mse']:.4f} (denoise stage)"
                  if d else "not measured (no metrics/denoise.json: run the denoise stage)"))
    accuracy = (f"; its test accuracy {doc['classifier_accuracy']:.4f}" if doc["classifier_accuracy"] is not None
                else "")
    items.append(("Feature extractor", f"{doc['extractor']}{accuracy}; {doc['num_samples']} samples per cell, "
                                       f"{doc['reference_images']} reference images; ruler {doc['ruler']} (its "
                                       "weights and reference statistics: FIDs of another ruler are not comparable)"))
    items.append(("Weights", doc["weights"]))
    for label, share in doc["same"]:
        items.append(("Same images", f"{label}: at every step count the same images up to rounding (no pixel more "
                                     f"than {ROUNDING} grey level apart, {share:.4%} of pixels differ at most), so "
                                     "the same scores but for the last digits; one line in the FID figure, "
                                     "labelled so"))
    return items


def verdict(cells: dict, best: tuple, floor: dict | None, lines: dict[str, str]) -> str:
    """What the best cell's FID says, beside it (sentences, without the last full stop): how far above the
    real-data floor (the scale of every FID here) and the margin to the next best cell (of other images than the
    best one's: ``ddim ≈ euler`` are one)."""
    fid = cells[best]["fid"]
    if floor and floor.get("fid") is not None:
        times = f" = {fid / floor['fid']:.1f}×" if floor["fid"] > 0 else ""
        parts = [f"FID {fid:.2f}{times} the real-data floor {floor['fid']:.2f} (what {floor.get('num_images', '?')} "
                 "real images score: a model's FID can approach it, not 0)"]
    else:
        parts = [f"FID {fid:.2f}, no real-data floor to scale it (run the fid_floor stage)"]
    twins = lines.get(best[0], best[0]).split(" ≈ ")
    others = sorted((c for c in cells if c[0] not in twins or c[1] != best[1]), key=lambda c: cells[c]["fid"])
    if others:
        nxt, worst = others[0], others[-1]
        parts.append(f"Next best: {nxt[0]}-{nxt[1]}, {cells[nxt]['fid']:.2f} (+{cells[nxt]['fid'] - fid:.2f})"
                     + (f"; worst: {worst[0]}-{worst[1]}, {cells[worst]['fid']:.2f}" if worst != nxt else ""))
    parts.append("One training seed: a margin between cells is real only beyond the spread over seeds "
                 "(python -m pipeline compare groups seeds)")
    return ". ".join(parts)


GUIDANCE_NOTE = ("Classifier-free guidance ε̃ = (1 + w) ε(x, y) − w ε(x, ∅) (Ho & Salimans 2022); w = 0 is the "
                 "conditional model. Class accuracy: the share of samples the pipeline's classifier assigns to the "
                 "class they were drawn for.")


def floor_line(floor: dict) -> str:
    """The real-data floor, the scale of every FID above: real training images against the same reference."""
    return (f"FID {floor['fid']:.2f}, precision {floor['precision']:.3f}, recall "
            f"{floor['recall']:.3f} ({floor['num_images']} real training images against the same reference: "
            "what a perfect model would score with as many samples)")


def describe_weights(infos: list[dict], ema: dict | None) -> str:
    """'ema (post-hoc power EMA, σ_rel 0.07)' and the like, from the cells' info.json and metrics/ema.json."""
    used = sorted({i.get("weights", "ema") for i in infos})
    if ema is None:
        average = "average not recorded"
    else:
        kind = {"power": "power-function EMA", "warmup": "EMA with warm-up", "fixed": "fixed-decay EMA"}.get(
            ema.get("kind"), f"{ema.get('kind')} EMA")
        detail = (f"σ_rel {ema['sigma_rel']}" if ema.get("sigma_rel") is not None
                  else f"decay {ema['decay']}" if "decay" in ema else "")
        source = "post-hoc (EDM2), " if ema.get("source") == "posthoc" else "train's "
        average = f"{source}{kind}" + (f", {detail}" if detail else "")
    return " and ".join(used) + f" (the checkpoint's average: {average})"


def sigma_rel_rows(cells: dict, samplers: list[str], steps: list[int], ema: dict | None) -> list[tuple]:
    """(sampler, steps, σ_rel, FID) per cell; none when the average has no σ_rel (not a power EMA)."""
    sigma = (ema or {}).get("sigma_rel")
    if sigma is None:
        return []
    return [(s, k, sigma, cells[s, k]["fid"]) for s in samplers for k in steps]


def read_cells(cells_dir: Path, samplers: list[str], steps: list[int], guidance: list[str]) -> tuple[dict, dict]:
    """The fid stage's metrics of every cell, {(sampler, steps): ...} and, guided, {(sampler, steps, guidance):
    ...}; a cell that lacks a metric the report needs fails."""
    cells = {(s, k): read_json(cells_dir / f"{s}-{k}.json") for s in samplers for k in steps}
    guided = {(s, k, g): read_json(cells_dir / f"{s}-{k}-{g}.json") for s in samplers for k in steps for g in guidance}
    for name, cell in [(f"{s}-{k}", c) for (s, k), c in cells.items()] + [("-".join(map(str, key)), c)
                                                                          for key, c in guided.items()]:
        needed = ("fid", "kid_mean", "extractor", "num_samples", "ruler") + (("class_accuracy", "w") if guidance else ())
        missing = [key for key in needed if key not in cell]
        if missing:
            raise InputError(f"{cells_dir / f'{name}.json'} lacks {', '.join(missing)} (rerun its fid stage)")
    return cells, guided


def ruler_of(cells: dict, guided: dict, floor: dict | None) -> str:
    """The id of the ruler every cell (and the floor) was measured with; ``InputError`` when they differ:
    FIDs of different rulers are no table."""
    rulers = {c["ruler"]["id"] for c in [*cells.values(), *guided.values()]}
    if floor is not None and floor.get("ruler") is not None:
        rulers.add(floor["ruler"])
    if len(rulers) != 1:
        raise InputError(f"the cells and the floor were measured with different rulers ({', '.join(sorted(rulers))}): "
                         "rerun the fid stages (dvc repro), or pin a ruler (fid.ruler)")
    return rulers.pop()


def block(path: Path | None, key: str) -> dict | None:
    """The ``key`` block of a stage's metrics file (``nll`` of metrics/nll.json, …); None when there is no file."""
    if path is None or not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get(key), dict):
        raise InputError(f"{path} holds no '{key}' block (written by an older version of its stage: rerun it)")
    return data[key]


def classifier_accuracy(path: Path, extractor: str) -> float | None:
    """The test accuracy of the classifier stage (None when absent); required with the ddpm-classifier extractor."""
    accuracy = (block(path, "classifier") or {}).get("test_accuracy")
    if extractor == "ddpm-classifier" and accuracy is None:
        raise FileNotFoundError(f"{path} does not exist: the ddpm-classifier extractor's test "
                                "accuracy belongs in the report (run the classifier stage)")
    return accuracy


def collect_metrics(cells: dict, guided: dict, samplers: list[str], steps: list[int], guidance: list[str],
                    best: tuple) -> dict:
    """metrics/fid.json: the best cell first (``best.fid``, ``best.sampler``, ``best.steps``), then the FID of
    every cell (``fid.<sampler>.<steps>``, a guided one ``fid.<sampler>.<steps>-<guidance>``)."""
    fid = {s: {str(k): cells[s, k]["fid"] for k in steps} for s in samplers}
    for (s, k, g), cell in guided.items():
        fid[s][f"{k}-{g}"] = cell["fid"]
    return {"best": {"fid": cells[best]["fid"], "sampler": best[0], "steps": best[1]}, "ruler": cells[best]["ruler"]["id"],
            "fid": fid}


def write_fid_csv(path: Path, cells: dict, samplers: list[str], steps: list[int], lines: dict[str, str]) -> None:
    """One row per cell: every score that all cells have, and the line it is drawn on (``same_lines``)."""
    columns = [c for c in ("fid", "kid_mean", "precision", "recall", "isc_mean", "class_accuracy")
               if all(c in v for v in cells.values())]
    write_csv(path, ["sampler", "steps", *columns, "line"],
              [(s, k, *(cells[s, k][c] for c in columns), lines[s]) for s in samplers for k in steps])


def write_sweep_csv(path: Path, sweep: list[dict]) -> None:
    columns = ("cell", "sampler", "steps", "guidance", "w", *(key for key, _, _ in SWEEP))
    write_csv(path, list(columns), [[r[c] if r[c] is not None else "" for c in columns] for r in sweep])


def plot_figures(cells: dict, samplers: list[str], steps: list[int], sweep: list[dict], conditional: bool,
                 figure: Path, sweep_figure: Path | None, loss_csv: Path, loss_figure: Path,
                 lines: dict[str, str]) -> list[tuple]:
    """Draw FID vs steps, the guidance sweep (or precision vs recall) and the loss curve: [(title, path)]."""
    figures_.plot_fid(cells, samplers, steps, figure, lines)
    figures = [("FID vs sampling steps", figure)]
    if sweep_figure is not None:
        figures_.plot_sweep(sweep, sweep_figure, lines)
        title = "Guidance sweep: FID vs class accuracy, precision vs recall" if conditional else "Precision vs recall"
        figures.append((title, sweep_figure))
    losses = read_losses(loss_csv)
    if losses:
        figures_.plot_loss(losses, loss_figure)
        figures.append(("Training loss", loss_figure))
    return figures


MATRIX = ("sample.samplers", "sample.steps", "sample.guidance")  # the report's params the tables show


def run_record() -> dict:
    """Which run made the report: the DVC experiment, the git revision (of HEAD, whose code it ran), the date."""
    return {"experiment": experiment_name(), "revision": git_revision()[:10],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def identical_note(label: str, infos: dict) -> str:
    """``label`` (``ddim ≈ euler``), with the reason when it is DDIM with η = 0 and Euler (from the cells'
    info.json, ``infos[sampler, steps]``)."""
    by_sampler = {s: info for (s, _), info in infos.items()}
    kinds = {(by_sampler.get(s) or {}).get("kind"): (by_sampler.get(s) or {}).get("options") or {}
             for s in label.split(" ≈ ")}
    if set(kinds) == {"ddim", "euler"} and kinds["ddim"].get("eta") == 0:
        return f"{label} (Euler on the probability-flow ODE is DDIM with η = 0)"
    return label


def report_doc(cells: dict, best: tuple, samplers: list[str], steps: list[int], guidance: list[str], *,
               accuracy: float | None, figures: list, inputs: dict, infos: dict, sweep: list[dict],
               conditional: bool, samples_dir: Path, same: dict[str, float], lines: dict[str, str]) -> dict:
    """What the markdown and the HTML report show (``render_markdown``, ``render_html``)."""
    sweep_table = None
    if conditional:
        sweep_table = {"header": ["cell", "guidance", "w", *(title for _, title, _ in SWEEP)],
                       "rows": [[r["cell"], r["guidance"], f"{r['w']:g}",
                                 *(fmt.format(r[key]) for key, _, fmt in SWEEP)] for r in sweep]}
    first = cells[best]
    doc = {"steps": steps, "extractor": first["extractor"], "ruler": first["ruler"]["id"],
           "num_samples": first["num_samples"], "reference_images": first.get("reference_images", "?"),
           "classifier_accuracy": accuracy, "best": best, "best_fid": first["fid"], "figures": figures,
           "verdict": verdict(cells, best, inputs["floor"], lines), "best_at": best_position(samplers, steps, best),
           "best_name": f"{best[0]}-{best[1]}",
           "floor": inputs["floor"], "nll": inputs["nll"], "denoise": inputs["denoise"], "run": inputs["run"],
           "params": inputs["params"], "weights": describe_weights(list(infos.values()), inputs["ema"]),
           "same": [(identical_note(label, infos), share) for label, share in same.items()],
           "tables": [{"title": title, "note": note, "what": what, "rows": rows}
                      for key, title, fmt, note, what in TABLES if (rows := table(cells, samplers, steps, key, fmt))
                      is not None],
           "sweep": sweep_table, "classes": first.get("classes") if conditional else None,
           "cells": [(name, samples_dir / name / "grid.png", samples_dir / name / "strip.png")
                     for s in samplers for k in steps for name in [f"{s}-{k}"] + [f"{s}-{k}-{g}" for g in guidance]]}
    return {**doc, "summary": summary(doc), "guidance_note": GUIDANCE_NOTE}


def read_inputs(params, floor: Path | None, nll: Path | None, denoise: Path | None, ema: Path | None) -> dict:
    """What the header shows besides the cells: the other stages' metrics (None where absent), the run, the params."""
    return {"floor": block(floor, "floor"), "nll": block(nll, "nll"), "denoise": block(denoise, "denoise"),
            "ema": block(ema, "average"), "run": run_record(),
            "params": {k: v for k, v in base.values(params, KEYS).items() if k not in MATRIX}}




@app.command()
@stage
def main(params: Path = PARAMS,
         cells: Path = typer.Option(Path("metrics/cells"), help="the fid stage's metrics of every cell"),
         metrics: Path = typer.Option(Path("metrics/fid.json"), help="best FID and every cell's FID (DVC metrics)"),
         plot: Path = typer.Option(Path("plots/fid_vs_steps.csv"), help="every cell's scores, for dvc plots"),
         figure: Path = typer.Option(Path("reports/fid_vs_steps.png"), help="FID against sampling steps"),
         markdown: Path = typer.Option(Path("reports/report.md"), help="the report in Markdown"),
         html: Path = typer.Option(Path("reports/report.html"), help="the report as one self-contained HTML file"),
         classifier_metrics: Path = typer.Option(Path("metrics/classifier.json"), help="extractor test accuracy"),
         loss: Path = typer.Option(Path("plots/train_loss.csv"), help="training loss curve (step, loss)"),
         loss_figure: Path = typer.Option(Path("reports/train_loss.png"), help="the loss curve's figure"),
         samples: Path = typer.Option(Path("samples"), help="folder of the cells' grid.png and strip.png"),
         ema_metrics: Path = typer.Option(Path("metrics/ema.json"), help="which average the ema stage chose"),
         sigma_plot: Path = typer.Option(Path("plots/fid_vs_sigma_rel.csv"),
                                         help="(sampler, steps, sigma_rel, fid) per cell, for dvc plots diff"),
         sweep_plot: Path = typer.Option(Path("plots/guidance_sweep.csv"),
                                         help="one row per cell and guidance weight w (FID, precision, recall, "
                                              "class accuracy)"),
         sweep_figure: Path = typer.Option(Path("reports/precision_recall.png"),
                                           help="precision vs recall per cell (with guidance: through its w, beside "
                                                "FID vs class accuracy: the guidance sweep)"),
         floor: Path = typer.Option(Path("metrics/fid_floor.json"), help="the real-data floor (fid-floor)"),
         nll_metrics: Path = typer.Option(Path("metrics/nll.json"), help="bits/dim for the header (nll)"),
         denoise_metrics: Path = typer.Option(Path("metrics/denoise.json"),
                                              help="the denoising MSE for the header (denoise)")):
    """Collect the cells into metrics/fid.json, the FID-vs-steps and precision-recall (guidance-sweep) plots and the
    markdown + HTML report."""
    p = base.load(params, "report", KEYS, diffusion, data, model, train, sample, fid)
    check_writable(metrics, plot, figure, markdown, html, loss_figure, sweep_plot, sweep_figure)
    samplers, steps, guidance = list(p.sample.samplers), sorted(p.sample.steps), list(p.sample.guidance)
    cell_metrics, guided = read_cells(cells, samplers, steps, guidance)
    best = min(cell_metrics, key=lambda c: cell_metrics[c]["fid"])
    accuracy = classifier_accuracy(classifier_metrics, cell_metrics[best]["extractor"])  # before anything is written
    inputs = read_inputs(p._obj, floor, nll_metrics, denoise_metrics, ema_metrics)
    ruler_of(cell_metrics, guided, inputs["floor"])
    write_metrics(metrics, collect_metrics(cell_metrics, guided, samplers, steps, guidance, best))
    lines, same = same_lines(samples, samplers, steps)
    write_fid_csv(plot, cell_metrics, samplers, steps, lines)
    write_csv(sigma_plot, ["sampler", "steps", "sigma_rel", "fid"],
              sigma_rel_rows(cell_metrics, samplers, steps, inputs["ema"]))
    infos = {(s, k): read_json(i) for s in samplers for k in steps
             if (i := samples / f"{s}-{k}" / "info.json").is_file()}
    sweep = sweep_rows(cell_metrics, guided, samplers, steps, guidance)
    write_sweep_csv(sweep_plot, sweep)
    conditional = all("class_accuracy" in c for c in cell_metrics.values())
    figs = plot_figures(cell_metrics, samplers, steps, sweep, conditional, figure, sweep_figure, loss, loss_figure,
                        lines)
    doc = report_doc(cell_metrics, best, samplers, steps, guidance, accuracy=accuracy, figures=figs, inputs=inputs,
                     infos=infos, sweep=sweep, conditional=conditional, samples_dir=samples, same=same, lines=lines)
    text = render(TEMPLATES[0], **doc, here=markdown.parent)
    write_atomic(markdown, text)
    write_atomic(html, render(TEMPLATES[1], **doc))
    print(text.split("\n## KID")[0])
    if doc["sweep"]:
        print("## Guidance sweep" + text.split("## Guidance sweep")[1].split("\n## ")[0])
    print(f"report: {markdown}, {html}")


if __name__ == "__main__":
    app()
