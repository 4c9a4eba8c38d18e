"""The pipeline's figures (matplotlib, Agg), each written atomically as a PNG: FID against sampling
steps (the report), the guidance sweep or precision against recall, the training loss, a study's
FID against steps per experiment, and FID against the EMA length σ_rel across experiments."""

import io
from pathlib import Path

from pipeline.outputs import write_atomic


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, figure: Path) -> None:
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    pyplot().close(fig)
    write_atomic(figure, png.getvalue())


def fid_at(entry: dict, sampler: str, steps: int):
    """The FID of ``sampler`` at ``steps`` in an experiment's ``{"fid": {sampler: {steps: FID}}}`` (or None)."""
    return ((entry["fid"] or {}).get(sampler) or {}).get(str(steps))


def plot_fid(cells: dict, samplers: list[str], steps: list[int], figure: Path, lines: dict[str, str]) -> None:
    """One line per sampler; samplers with the same images (``lines``, from ``same_lines``) one line labelled
    with all of them."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label in dict.fromkeys(lines[s] for s in samplers):
        s = label.split(" ≈ ")[0]
        ax.plot(steps, [cells[s, k]["fid"] for k in steps], marker="o", label=label)
    ax.set(xscale="log", xlabel="sampling steps", ylabel="FID (lower is better)", title="FID vs sampling steps")
    ax.set_xticks(steps, [str(k) for k in steps])
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)
    ax.legend()
    save(fig, figure)


def plot_sweep(rows: list[dict], figure: Path, lines: dict[str, str] | None = None) -> None:
    """FID vs class accuracy (class models) and precision vs recall, one line per cell through its w (each
    point labelled with its w); without guidance (every w 0) one unlabelled point per cell. The cells of
    samplers with the same images (``lines``: ``ddim ≈ euler``) are one, labelled ``ddim ≈ euler-20``."""
    lines = lines or {}

    def drawn(r: dict) -> bool:  # the first sampler of its line stands for the others
        return lines.get(r["sampler"], r["sampler"]).split(" ≈ ")[0] == r["sampler"]
    plt = pyplot()
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
    save(fig, figure)


def plot_loss(losses: list[tuple[int, float]], figure: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([s for s, _ in losses], [v for _, v in losses], lw=1)
    ax.set(xlabel="training step", ylabel="loss", title="Training loss")
    ax.grid(True, alpha=0.3)
    save(fig, figure)


def plot_study(panels: list[dict], figure: Path) -> None:
    """One panel per experiment (``{"name", "n", "lines": {sampler: [(steps, mean, std), ...]}}``, all on one
    FID scale, so that a panel of FIDs near 130 does not look like one near 20): FID against sampling steps, a
    line per sampler, error bars ± std."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 0.6, 3.8), dpi=120, squeeze=False,
                             sharey=True)
    for ax, panel in zip(axes[0], panels):
        for sampler, points in panel["lines"].items():
            points = sorted(points)
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                        capsize=3, label=sampler)
        steps = sorted({p[0] for points in panel["lines"].values() for p in points})
        ax.set(xscale="log", xlabel="sampling steps", title=f"{panel['name']} (n = {panel['n']})")
        if steps:
            ax.set_xticks(steps, [str(k) for k in steps])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        if panel["lines"]:
            ax.legend(fontsize=8)
    axes[0][0].set_ylabel("FID (lower is better)")
    save(fig, figure)


def plot_sigma_rel(points: list[dict], references: list[dict], samplers: list[str], steps: int, figure: Path) -> None:
    """One line per sampler over σ_rel, the best point of each marked; references dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for i, s in enumerate(samplers):
        colour = f"C{i}"
        xy = [(p["sigma_rel"], f) for p in points if (f := fid_at(p, s, steps)) is not None]
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", color=colour, label=s)
        x, y = min(xy, key=lambda v: v[1])
        ax.plot([x], [y], marker="o", markersize=11, markerfacecolor="none", color=colour)
        for j, r in enumerate(references):
            f = fid_at(r, s, steps)
            if f is not None:
                ax.axhline(f, color=colour, lw=1, ls=("--", ":", "-.")[j % 3],
                           label=f"{s}: {r['label']} ({r['experiment']})")
    ax.set(xlabel="EMA length σ_rel", ylabel="FID (lower is better)",
           title=f"FID vs EMA length ({steps} sampling steps)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    save(fig, figure)
