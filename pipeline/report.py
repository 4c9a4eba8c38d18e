"""Stage `report`: gather the per-cell metrics into one metrics file (``fid.<sampler>.<steps>``
columns in `dvc exp show`), an FID-vs-steps plot (CSV for `dvc plots`, and PNG) and a
markdown table (rows = sampler, columns = steps, as in the DDIM paper's Table 1)."""

import io
from pathlib import Path

from pipeline.common import read_json, write_atomic, write_csv, write_json
from pipeline.params import for_stage, load_params


def main(params_path: Path, cells_dir: Path, metrics_out: Path, plot_csv: Path, figure: Path, markdown: Path) -> None:
    sp = for_stage(load_params(params_path), "report").sample
    samplers, steps = list(sp.samplers), sorted(sp.steps)
    cells = {(s, k): read_json(cells_dir / f"{s}-{k}.json") for s in samplers for k in steps}
    for (s, k), cell in cells.items():
        missing = [key for key in ("fid", "kid_mean", "extractor", "num_samples") if key not in cell]
        if missing:
            raise ValueError(f"{cells_dir / f'{s}-{k}.json'} lacks {', '.join(missing)} (rerun its fid stage)")
    metrics = {name: {s: {str(k): cells[s, k][key] for k in steps} for s in samplers}
               for name, key in (("fid", "fid"), ("kid", "kid_mean"))}
    best = min(cells, key=lambda c: cells[c]["fid"])
    metrics["best"] = {"fid": cells[best]["fid"], "sampler": best[0], "steps": best[1]}
    write_json(metrics_out, metrics)
    write_csv(plot_csv, ["sampler", "steps", "fid", "kid"],
              [(s, k, cells[s, k]["fid"], cells[s, k]["kid_mean"]) for s in samplers for k in steps])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for s in samplers:
        ax.plot(steps, [cells[s, k]["fid"] for k in steps], marker="o", label=s)
    ax.set(xscale="log", xlabel="sampling steps", ylabel="FID (lower is better)", title="FID vs sampling steps")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_atomic(figure, png.getvalue())

    extractor = cells[best]["extractor"]
    n = cells[best]["num_samples"]
    lines = [f"# FID by sampler and steps\n", f"Feature extractor: `{extractor}`, {n} samples per cell. Lower is better.\n",
             "| sampler | " + " | ".join(f"{k} steps" for k in steps) + " |",
             "|---|" + "---:|" * len(steps)]
    lines += [f"| {s} | " + " | ".join(f"{cells[s, k]['fid']:.2f}" for k in steps) + " |" for s in samplers]
    lines += ["", f"Best: **{best[0]}** with {best[1]} steps, FID {cells[best]['fid']:.2f}.", ""]
    write_atomic(markdown, "\n".join(lines))
    print("\n".join(lines))
