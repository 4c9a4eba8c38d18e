"""Stage `report`: gather the per-cell metrics into one metrics file (``fid.<sampler>.<steps>``
columns in `dvc exp show`), an FID-vs-steps plot (CSV for `dvc plots`, one line per
sampler, and PNG), the loss curve as PNG, and the experiment's report in markdown and
HTML: FID table (rows = sampler, columns = steps, as in the DDIM paper's Table 1),
KID / precision / recall / Inception Score tables, the extractor's test accuracy, the
figures, and per cell the sample grid and the denoising strip.

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
grids show one row per class.

The markdown links images relative to itself; the HTML embeds them (base64), so it
opens anywhere as one file.
"""

import base64
import html
import io
from pathlib import Path

from ddpm.errors import InputError
from pipeline.common import check_writable, read_json, read_losses, write_atomic, write_csv, write_json
from pipeline.params import for_stage, load_params

# (key in a cell's metrics, table title, format, lower is better?)
TABLES = [("fid", "FID", "{:.2f}", "lower is better"), ("kid_mean", "KID", "{:.4f}", "lower is better"),
          ("precision", "Precision", "{:.3f}", "higher is better"), ("recall", "Recall", "{:.3f}", "higher is better"),
          ("isc_mean", "Inception Score", "{:.2f}", "higher is better"),
          ("class_accuracy", "Class accuracy", "{:.3f}", "higher is better")]
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


def plot_fid(cells: dict, samplers: list[str], steps: list[int], figure: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for s in samplers:
        ax.plot(steps, [cells[s, k]["fid"] for k in steps], marker="o", label=s)
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


def plot_sweep(rows: list[dict], figure: Path) -> None:
    """FID vs class accuracy (class models) and precision vs recall, one line per cell through its w."""
    plt = _plt()
    panels = [("recall", "precision")]
    if all(r["class_accuracy"] is not None for r in rows):
        panels.insert(0, ("class_accuracy", "fid"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), dpi=120, squeeze=False)
    labels = {"fid": "FID (lower is better)", "class_accuracy": "class accuracy (higher is better)",
              "precision": "precision", "recall": "recall"}
    for ax, (x, y) in zip(axes[0], panels):
        for cell in dict.fromkeys(r["cell"] for r in rows):
            mine = [r for r in rows if r["cell"] == cell]
            ax.plot([r[x] for r in mine], [r[y] for r in mine], marker="o", label=cell)
            for r in mine:
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
    import os

    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def render_markdown(doc: dict, here: Path) -> str:
    steps = doc["steps"]
    lines = ["# Experiment report", ""]
    lines += [f"- Feature extractor: `{doc['extractor']}`, {doc['num_samples']} samples per cell, "
              f"{doc['reference_images']} reference images."]
    if doc["classifier_accuracy"] is not None:
        lines += [f"- Extractor (classifier) test accuracy: {doc['classifier_accuracy']:.4f}"]
    lines += [f"- Weights: {doc['weights']}."]
    lines += [f"- Best: **{doc['best'][0]}** with {doc['best'][1]} steps, FID {doc['best_fid']:.2f}."]
    if doc["floor"]:
        lines += [f"- {floor_line(doc['floor'])}"]
    lines += [""]
    for title, note, rows in doc["tables"]:
        lines += [f"## {title} by sampler and steps ({note})", "",
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
    return (f"Real-data floor: FID {floor['fid']:.2f}, precision {floor['precision']:.3f}, recall "
            f"{floor['recall']:.3f} ({floor['num_images']} real training images against the same reference: "
            "what a perfect model would score with as many samples).")


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
           ".cell{display:inline-block;vertical-align:top;margin:0 1em 1em 0}</style></head><body>",
           "<h1>Experiment report</h1><ul>",
           f"<li>Feature extractor: <code>{e(doc['extractor'])}</code>, {doc['num_samples']} samples per cell, "
           f"{doc['reference_images']} reference images.</li>"]
    if doc["classifier_accuracy"] is not None:
        out.append(f"<li>Extractor (classifier) test accuracy: {doc['classifier_accuracy']:.4f}</li>")
    out.append(f"<li>Weights: {e(doc['weights'])}.</li>")
    out.append(f"<li>Best: <b>{e(doc['best'][0])}</b> with {doc['best'][1]} steps, FID {doc['best_fid']:.2f}.</li>")
    if doc["floor"]:
        out.append(f"<li>{e(floor_line(doc['floor']))}</li>")
    out.append("</ul>")
    for title, note, rows in doc["tables"]:
        out.append(f'<h2>{e(title)} by sampler and steps <small>({e(note)})</small></h2><table class="{e(title)}">')
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


def classifier_accuracy(path: Path, extractor: str) -> float | None:
    """The test accuracy of the classifier stage (None when absent); required with the ddpm-classifier extractor."""
    accuracy = read_json(path).get("test_accuracy") if path.is_file() else None
    if extractor == "ddpm-classifier" and accuracy is None:
        raise FileNotFoundError(f"{path} does not exist: the ddpm-classifier extractor's test "
                                "accuracy belongs in the report (run the classifier stage)")
    return accuracy


def collect_metrics(cells: dict, guided: dict, samplers: list[str], steps: list[int], guidance: list[str],
                    best: tuple, floor: dict | None) -> dict:
    """metrics/fid.json: each metric per sampler and steps (the guided ones also per guidance), the best
    cell and the real-data floor."""
    metrics = {name: {s: {str(k): cells[s, k][key] for k in steps} for s in samplers}
               for name, key in (("fid", "fid"), ("kid", "kid_mean"), ("precision", "precision"),
                                 ("recall", "recall"), ("isc", "isc_mean"), ("class_accuracy", "class_accuracy"))
               if all(key in c for c in cells.values())}
    if guided:  # guided.<metric>.<sampler>.<steps>.<guidance>
        metrics["guided"] = {key: {s: {str(k): {g: guided[s, k, g][key] for g in guidance} for k in steps}
                                   for s in samplers} for key, _, _ in SWEEP}
    metrics["best"] = {"fid": cells[best]["fid"], "sampler": best[0], "steps": best[1]}
    if floor is not None:
        metrics["floor"] = {k: floor[k] for k in ("fid", "precision", "recall", "num_images") if k in floor}
    return metrics


def write_sweep_csv(path: Path, sweep: list[dict]) -> None:
    columns = ("cell", "sampler", "steps", "guidance", "w", *(key for key, _, _ in SWEEP))
    write_csv(path, list(columns), [[r[c] if r[c] is not None else "" for c in columns] for r in sweep])


def plot_figures(cells: dict, samplers: list[str], steps: list[int], sweep: list[dict], conditional: bool,
                 figure: Path, sweep_figure: Path | None, loss_csv: Path, loss_figure: Path) -> list[tuple]:
    """Draw FID vs steps, the guidance sweep (or precision vs recall) and the loss curve: [(title, path)]."""
    plot_fid(cells, samplers, steps, figure)
    figures = [("FID vs sampling steps", figure)]
    if sweep_figure is not None:
        plot_sweep(sweep, sweep_figure)
        title = "Guidance sweep: FID vs class accuracy, precision vs recall" if conditional else "Precision vs recall"
        figures.append((title, sweep_figure))
    losses = read_losses(loss_csv)
    if losses:
        plot_loss(losses, loss_figure)
        figures.append(("Training loss", loss_figure))
    return figures


def report_doc(cells: dict, best: tuple, samplers: list[str], steps: list[int], guidance: list[str], *,
               accuracy: float | None, figures: list, floor: dict | None, weights: str, sweep: list[dict],
               conditional: bool, samples_dir: Path) -> dict:
    """What the markdown and the HTML report show (``render_markdown``, ``render_html``)."""
    sweep_table = None
    if conditional:
        sweep_table = (["cell", "guidance", "w", *(title for _, title, _ in SWEEP)],
                       [[r["cell"], r["guidance"], f"{r['w']:g}", *(fmt.format(r[key]) for key, _, fmt in SWEEP)]
                        for r in sweep])
    return {"steps": steps, "extractor": cells[best]["extractor"], "num_samples": cells[best]["num_samples"],
            "reference_images": cells[best].get("reference_images", "?"), "classifier_accuracy": accuracy,
            "best": best, "best_fid": cells[best]["fid"], "figures": figures, "floor": floor,
            "weights": weights,
            "tables": [(title, note, rows) for key, title, fmt, note in TABLES
                       if (rows := table(cells, samplers, steps, key, fmt)) is not None],
            "sweep": sweep_table, "classes": cells[best].get("classes") if conditional else None,
            "cells": [(name, samples_dir / name / "grid.png", samples_dir / name / "strip.png")
                      for s in samplers for k in steps for name in [f"{s}-{k}"] + [f"{s}-{k}-{g}" for g in guidance]]}


def main(params_path: Path, cells_dir: Path, metrics_out: Path, plot_csv: Path, figure: Path, markdown: Path,
         html_out: Path, classifier_metrics: Path, loss_csv: Path, loss_figure: Path, samples_dir: Path,
         ema_metrics: Path | None = None, sigma_plot: Path | None = None, sweep_csv: Path | None = None,
         sweep_figure: Path | None = None, floor_metrics: Path | None = None) -> None:
    sp = for_stage(load_params(params_path), "report").sample
    check_writable(*(p for p in (metrics_out, plot_csv, figure, markdown, html_out, loss_figure, sweep_csv,
                                 sweep_figure) if p is not None))
    samplers, steps, guidance = list(sp.samplers), sorted(sp.steps), list(sp.guidance)
    cells, guided = read_cells(cells_dir, samplers, steps, guidance)
    best = min(cells, key=lambda c: cells[c]["fid"])
    accuracy = classifier_accuracy(classifier_metrics, cells[best]["extractor"])  # before anything is written
    floor = read_json(floor_metrics) if floor_metrics is not None and floor_metrics.is_file() else None
    write_json(metrics_out, collect_metrics(cells, guided, samplers, steps, guidance, best, floor))
    columns = [c for c in ("fid", "kid_mean", "precision", "recall") if all(c in v for v in cells.values())]
    write_csv(plot_csv, ["sampler", "steps", *columns],
              [(s, k, *(cells[s, k][c] for c in columns)) for s in samplers for k in steps])
    ema = read_json(ema_metrics) if ema_metrics is not None and ema_metrics.is_file() else None
    if sigma_plot is not None:
        write_csv(sigma_plot, ["sampler", "steps", "sigma_rel", "fid"], sigma_rel_rows(cells, samplers, steps, ema))
    infos = [read_json(i) for s in samplers for k in steps if (i := samples_dir / f"{s}-{k}" / "info.json").is_file()]
    sweep = sweep_rows(cells, guided, samplers, steps, guidance)
    if sweep_csv is not None:
        write_sweep_csv(sweep_csv, sweep)
    conditional = all("class_accuracy" in c for c in cells.values())
    figures = plot_figures(cells, samplers, steps, sweep, conditional, figure, sweep_figure, loss_csv, loss_figure)
    doc = report_doc(cells, best, samplers, steps, guidance, accuracy=accuracy, figures=figures, floor=floor,
                     weights=describe_weights(infos, ema), sweep=sweep, conditional=conditional,
                     samples_dir=samples_dir)
    text = render_markdown(doc, markdown.parent)
    write_atomic(markdown, text)
    write_atomic(html_out, render_html(doc))
    print(text.split("\n## KID")[0])
    if doc["sweep"]:
        print("## Guidance sweep" + text.split("## Guidance sweep")[1].split("\n## ")[0])
    print(f"report: {markdown}, {html_out}")
