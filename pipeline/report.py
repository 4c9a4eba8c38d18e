"""Stage `report`: gather the per-cell metrics into the experiment's metrics file and report.

``metrics/fid.json`` holds what `dvc exp show` lists: ``best.fid``, ``best.sampler`` and
``best.steps`` (the best cell, first, so that a plain ``dvc exp show`` shows it) and one FID
per cell, ``fid.<sampler>.<steps>`` (a guided cell: ``fid.<sampler>.<steps>-<guidance>``). The
rest of each cell (KID, precision, recall, Inception Score, class accuracy) stays in the
cells' own files (``metrics/cells/``, not DVC metrics) and goes to the plots: FID vs steps
(``plots/fid_vs_steps.csv`` for `dvc plots`, one line per sampler, and PNG) with every
metric of every cell, the guidance sweep.

The report, in markdown and HTML: a header saying what was run (the DVC experiment, the git
revision, the date, the key params) and what came out (best FID and the real-data floor,
bits/dim from `nll`, the denoising MSE from `denoise`, the extractor's test accuracy, which
weights the cells sampled), the FID table (rows = sampler, columns = steps, as in the DDIM
paper's Table 1), KID / precision / recall / Inception Score tables with their units, the
figures, and per cell the sample grid and the denoising strip. Samplers whose samples are the
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
point per cell and no w labels.

The markdown links images relative to itself; the HTML embeds them (base64), so it
opens anywhere as one file (also in MLflow's artifact viewer, which shows no markdown images).
"""

import base64
import html
import io
import os
import time
from pathlib import Path

from ddpm.errors import InputError
from pipeline.common import (check_writable, experiment_name, git_revision, read_json, read_losses, write_atomic,
                             write_csv, write_metrics)
from pipeline.params import for_stage, load_params, stage_values

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


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
            if x is None or y is None or x.shape != y.shape or (x.int() - y.int()).abs().max() > ROUNDING:
                return None
            shares.append((x != y).float().mean().item())
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


def plot_fid(cells: dict, samplers: list[str], steps: list[int], figure: Path, lines: dict[str, str]) -> None:
    """One line per sampler; samplers with the same images (``lines``, from ``same_lines``) one line labelled
    with all of them."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label in dict.fromkeys(lines[s] for s in samplers):
        s = label.split(" ≈ ")[0]
        ax.plot(steps, [cells[s, k]["fid"] for k in steps], marker="o", label=label)
    ax.set(xscale="log", xlabel="sampling steps", ylabel="FID (lower is better)", title="FID vs sampling steps")
    ax.set_xticks(steps, [str(k) for k in steps])
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)
    ax.legend()
    _save(plt, fig, figure)


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


def plot_sweep(rows: list[dict], figure: Path, lines: dict[str, str] | None = None) -> None:
    """FID vs class accuracy (class models) and precision vs recall, one line per cell through its w (each
    point labelled with its w); without guidance (every w 0) one unlabelled point per cell. The cells of
    samplers with the same images (``lines``: ``ddim ≈ euler``) are one, labelled ``ddim ≈ euler-20``."""
    lines = lines or {}

    def drawn(r: dict) -> bool:  # the first sampler of its line stands for the others
        return lines.get(r["sampler"], r["sampler"]).split(" ≈ ")[0] == r["sampler"]
    plt = _plt()
    panels = [("recall", "precision")]
    if all(r["class_accuracy"] is not None for r in rows):
        panels.insert(0, ("class_accuracy", "fid"))
    guided = any(r["guidance"] != "none" for r in rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), dpi=120, squeeze=False)
    labels = {"fid": "FID (lower is better)", "class_accuracy": "class accuracy (higher is better)",
              "precision": "precision", "recall": "recall"}
    for ax, (x, y) in zip(axes[0], panels):
        for cell in dict.fromkeys(r["cell"] for r in rows if drawn(r)):
            mine = [r for r in rows if r["cell"] == cell]
            label = f"{lines.get(mine[0]['sampler'], mine[0]['sampler'])}-{mine[0]['steps']}"
            ax.plot([r[x] for r in mine], [r[y] for r in mine], marker="o", label=label)
            for r in mine if guided else []:
                ax.annotate(f"w={r['w']:g}" + ("" if r["guidance"] in ("none", f"w{r['w']:g}") else f" {r['guidance']}"),
                            (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        short = {"fid": "FID", "class_accuracy": "class accuracy", "precision": "precision", "recall": "recall"}
        ax.set(xlabel=labels[x], ylabel=labels[y], title=f"{short[y]} vs {short[x]}")
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    _save(plt, fig, figure)


def _save(plt, fig, figure: Path) -> None:
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_atomic(figure, png.getvalue())


def plot_loss(losses: list[tuple[int, float]], figure: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([s for s, _ in losses], [v for _, v in losses], lw=1)
    ax.set(xlabel="training step", ylabel="loss", title="Training loss")
    ax.grid(True, alpha=0.3)
    _save(plt, fig, figure)


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def summary(doc: dict) -> list[tuple[str, str]]:
    """The header of the report, (label, text) per line: what was run and what came out."""
    run = doc["run"]
    items = [("Run", f"DVC experiment {run['experiment']}, git revision {run['revision']}, made {run['date']}"),
             ("Params", ", ".join(f"{k} {v}" for k, v in doc["params"].items())),
             ("Best", f"{doc['best'][0]} with {doc['best'][1]} steps: FID {doc['best_fid']:.2f}")]
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
                                       f"{doc['reference_images']} reference images"))
    items.append(("Weights", doc["weights"]))
    for label, share in doc["same"]:
        items.append(("Same images", f"{label}: at every step count the same images up to rounding (no pixel more "
                                     f"than {ROUNDING} grey level apart, {share:.4%} of pixels differ at most), so "
                                     "the same scores but for the last digits; one line in the FID figure, "
                                     "labelled so"))
    return items


def render_markdown(doc: dict, here: Path) -> str:
    steps = doc["steps"]
    lines = ["# Experiment report", ""]
    lines += [f"- **{label}**: {text}." for label, text in summary(doc)] + [""]
    for title, note, what, rows in doc["tables"]:
        lines += [f"## {title} by sampler and steps ({note})", "", what, "",
                  "| sampler | " + " | ".join(f"{k} steps" for k in steps) + " |", "|---|" + "---:|" * len(steps)]
        lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    if doc["sweep"]:
        header, rows = doc["sweep"]
        lines += ["## Guidance sweep", "", GUIDANCE_NOTE, "", "| " + " | ".join(header) + " |",
                  "|---|---|" + "---:|" * (len(header) - 2)]
        lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    for title, path in doc["figures"]:
        lines += [f"## {title}", "", f"![{title}]({_relative(path, here)})", ""]
    lines += ["## Samples", ""]
    if doc["classes"]:
        lines += [f"One row per class: {', '.join(doc['classes'])}.", ""]
    for name, grid, strip in doc["cells"]:
        lines += [f"### {name}", ""]
        lines += [f"![{name} samples]({_relative(grid, here)})" if grid.is_file() else "(no grid)", ""]
        if strip.is_file():
            lines += ["Denoising x_T … x_0:", "", f"![{name} denoising strip]({_relative(strip, here)})", ""]
    return "\n".join(lines)


GUIDANCE_NOTE = ("Classifier-free guidance ε̃ = (1 + w) ε(x, y) − w ε(x, ∅) (Ho & Salimans 2022); w = 0 is the "
                 "conditional model. Class accuracy: the share of samples the pipeline's classifier assigns to the "
                 "class they were drawn for.")


def floor_line(floor: dict) -> str:
    """The real-data floor, the scale of every FID above: real training images against the same reference."""
    return (f"FID {floor['fid']:.2f}, precision {floor['precision']:.3f}, recall "
            f"{floor['recall']:.3f} ({floor['num_images']} real training images against the same reference: "
            "what a perfect model would score with as many samples)")


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f"<p><em>{html.escape(alt)}: missing</em></p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_html(doc: dict) -> str:
    e = html.escape
    steps = doc["steps"]
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>Experiment report</title>',
           "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
           "table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #bbb;padding:.3em .7em}"
           "td.n{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%;image-rendering:pixelated}"
           "table.summary th{text-align:left;vertical-align:top;background:#f3f3f3;white-space:nowrap}"
           "p.what{color:#444;max-width:60em}"
           ".cell{display:inline-block;vertical-align:top;margin:0 1em 1em 0}</style></head><body>",
           '<h1>Experiment report</h1><table class="summary">']
    out += [f"<tr><th>{e(label)}</th><td>{e(text)}</td></tr>" for label, text in summary(doc)]
    out.append("</table>")
    for title, note, what, rows in doc["tables"]:
        out.append(f'<h2>{e(title)} by sampler and steps <small>({e(note)})</small></h2><p class="what">{e(what)}</p>'
                   f'<table class="{e(title)}">')
        out.append("<tr><th>sampler</th>" + "".join(f"<th>{k} steps</th>" for k in steps) + "</tr>")
        out += ["<tr><th>" + e(r[0]) + "</th>" + "".join(f'<td class="n">{e(v)}</td>' for v in r[1:]) + "</tr>"
                for r in rows]
        out.append("</table>")
    if doc["sweep"]:
        header, rows = doc["sweep"]
        out.append(f'<h2>Guidance sweep</h2><p>{e(GUIDANCE_NOTE)}</p><table class="guidance">')
        out.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        out += ["<tr>" + "".join(f"<th>{e(v)}</th>" for v in r[:2]) + "".join(f'<td class="n">{e(v)}</td>' for v in r[2:])
                + "</tr>" for r in rows]
        out.append("</table>")
    for title, path in doc["figures"]:
        out.append(f"<h2>{e(title)}</h2>{_img(path, title)}")
    out.append("<h2>Samples</h2>")
    if doc["classes"]:
        out.append(f"<p>One row per class: {e(', '.join(doc['classes']))}.</p>")
    for name, grid, strip in doc["cells"]:
        out.append(f'<div class="cell"><h3>{e(name)}</h3>{_img(grid, name + " samples")}')
        if strip.is_file():
            out.append(f"<p>Denoising x<sub>T</sub> … x<sub>0</sub></p>{_img(strip, name + ' denoising strip')}")
        out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


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
        needed = ("fid", "kid_mean", "extractor", "num_samples") + (("class_accuracy", "w") if guidance else ())
        missing = [key for key in needed if key not in cell]
        if missing:
            raise InputError(f"{cells_dir / f'{name}.json'} lacks {', '.join(missing)} (rerun its fid stage)")
    return cells, guided


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
    return {"best": {"fid": cells[best]["fid"], "sampler": best[0], "steps": best[1]}, "fid": fid}


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
    plot_fid(cells, samplers, steps, figure, lines)
    figures = [("FID vs sampling steps", figure)]
    if sweep_figure is not None:
        plot_sweep(sweep, sweep_figure, lines)
        title = "Guidance sweep: FID vs class accuracy, precision vs recall" if conditional else "Precision vs recall"
        figures.append((title, sweep_figure))
    losses = read_losses(loss_csv)
    if losses:
        plot_loss(losses, loss_figure)
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
               conditional: bool, samples_dir: Path, same: dict[str, float]) -> dict:
    """What the markdown and the HTML report show (``render_markdown``, ``render_html``)."""
    sweep_table = None
    if conditional:
        sweep_table = (["cell", "guidance", "w", *(title for _, title, _ in SWEEP)],
                       [[r["cell"], r["guidance"], f"{r['w']:g}", *(fmt.format(r[key]) for key, _, fmt in SWEEP)]
                        for r in sweep])
    return {"steps": steps, "extractor": cells[best]["extractor"], "num_samples": cells[best]["num_samples"],
            "reference_images": cells[best].get("reference_images", "?"), "classifier_accuracy": accuracy,
            "best": best, "best_fid": cells[best]["fid"], "figures": figures, "floor": inputs["floor"],
            "nll": inputs["nll"], "denoise": inputs["denoise"], "run": inputs["run"], "params": inputs["params"],
            "weights": describe_weights(list(infos.values()), inputs["ema"]),
            "same": [(identical_note(label, infos), share) for label, share in same.items()],
            "tables": [(title, note, what, rows) for key, title, fmt, note, what in TABLES
                       if (rows := table(cells, samplers, steps, key, fmt)) is not None],
            "sweep": sweep_table, "classes": cells[best].get("classes") if conditional else None,
            "cells": [(name, samples_dir / name / "grid.png", samples_dir / name / "strip.png")
                      for s in samplers for k in steps for name in [f"{s}-{k}"] + [f"{s}-{k}-{g}" for g in guidance]]}


def read_inputs(params, floor: Path | None, nll: Path | None, denoise: Path | None, ema: Path | None) -> dict:
    """What the header shows besides the cells: the other stages' metrics (None where absent), the run, the params."""
    return {"floor": block(floor, "floor"), "nll": block(nll, "nll"), "denoise": block(denoise, "denoise"),
            "ema": block(ema, "average"), "run": run_record(),
            "params": {k: v for k, v in stage_values(params, "report").items() if k not in MATRIX}}


def main(params_path: Path, cells_dir: Path, metrics_out: Path, plot_csv: Path, figure: Path, markdown: Path,
         html_out: Path, classifier_metrics: Path, loss_csv: Path, loss_figure: Path, samples_dir: Path,
         ema_metrics: Path | None = None, sigma_plot: Path | None = None, sweep_csv: Path | None = None,
         sweep_figure: Path | None = None, floor_metrics: Path | None = None, nll_metrics: Path | None = None,
         denoise_metrics: Path | None = None) -> None:
    params = load_params(params_path)
    sp = for_stage(params, "report").sample
    check_writable(*(p for p in (metrics_out, plot_csv, figure, markdown, html_out, loss_figure, sweep_csv,
                                 sweep_figure) if p is not None))
    samplers, steps, guidance = list(sp.samplers), sorted(sp.steps), list(sp.guidance)
    cells, guided = read_cells(cells_dir, samplers, steps, guidance)
    best = min(cells, key=lambda c: cells[c]["fid"])
    accuracy = classifier_accuracy(classifier_metrics, cells[best]["extractor"])  # before anything is written
    inputs = read_inputs(params, floor_metrics, nll_metrics, denoise_metrics, ema_metrics)
    write_metrics(metrics_out, collect_metrics(cells, guided, samplers, steps, guidance, best))
    lines, same = same_lines(samples_dir, samplers, steps)
    write_fid_csv(plot_csv, cells, samplers, steps, lines)
    if sigma_plot is not None:
        write_csv(sigma_plot, ["sampler", "steps", "sigma_rel", "fid"],
                  sigma_rel_rows(cells, samplers, steps, inputs["ema"]))
    infos = {(s, k): read_json(i) for s in samplers for k in steps
             if (i := samples_dir / f"{s}-{k}" / "info.json").is_file()}
    sweep = sweep_rows(cells, guided, samplers, steps, guidance)
    if sweep_csv is not None:
        write_sweep_csv(sweep_csv, sweep)
    conditional = all("class_accuracy" in c for c in cells.values())
    figures = plot_figures(cells, samplers, steps, sweep, conditional, figure, sweep_figure, loss_csv, loss_figure,
                           lines)
    doc = report_doc(cells, best, samplers, steps, guidance, accuracy=accuracy, figures=figures, inputs=inputs,
                     infos=infos, sweep=sweep, conditional=conditional, samples_dir=samples_dir, same=same)
    text = render_markdown(doc, markdown.parent)
    write_atomic(markdown, text)
    write_atomic(html_out, render_html(doc))
    print(text.split("\n## KID")[0])
    if doc["sweep"]:
        print("## Guidance sweep" + text.split("## Guidance sweep")[1].split("\n## ")[0])
    print(f"report: {markdown}, {html_out}")
