"""FID against the EMA length σ_rel across DVC experiments (EDM2 Fig. 1), for
``python -m pipeline compare --sigma-rel-figure``: a sweep such as
``dvc exp run --queue -S 'ema.sigma_rel=0.03,0.05,0.1,0.2'`` makes one experiment per σ_rel.

Every experiment whose cells sampled an average with a σ_rel (``metrics/ema.json``'s
``average`` block: a power EMA, train's own or post-hoc) is a point per sampler; one line per sampler joins them
(at ``steps`` sampling steps). Experiments without one — a fixed-decay or warm-up EMA, or
``sample.weights: raw`` — are drawn as horizontal references at their FID.
"""

from pathlib import Path

from ddpm.errors import InputError

EMA_FILE = "metrics/ema.json"
# the average's block in it; experiments recorded before the metrics were named by block hold it at the top
EMA_BLOCKS = ("data.average", "data")


def _get(d, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def sweep(revisions) -> tuple[list[dict], list[dict]]:
    """(points, references) from ``compare._revisions`` output: each {experiment, sigma_rel or
    label, fid: {sampler: {steps: FID}}}."""
    points, references = [], []
    for name, rev, data in revisions:
        metrics = data.get("metrics") or {}
        fid = _get(metrics.get("metrics/fid.json") or {}, "data.fid")
        ema = next((b for key in EMA_BLOCKS if isinstance(b := _get(metrics.get(EMA_FILE) or {}, key), dict)
                    and "kind" in b), None)
        if not isinstance(fid, dict) or not isinstance(ema, dict):
            continue
        params = _get((data.get("params") or {}).get("params.yaml") or {}, "data") or {}
        experiment = name or (str(rev)[:7] if len(str(rev)) == 40 else str(rev))
        if _get(params, "sample.weights") == "raw":
            references.append({"experiment": experiment, "label": "raw weights", "fid": fid})
        elif ema.get("sigma_rel") is not None:
            points.append({"experiment": experiment, "sigma_rel": float(ema["sigma_rel"]), "fid": fid,
                           "source": ema.get("source")})
        else:
            detail = f" {ema['decay']}" if "decay" in ema else ""
            references.append({"experiment": experiment, "label": f"{ema.get('kind')} EMA{detail}", "fid": fid})
    points.sort(key=lambda p: p["sigma_rel"])
    return points, references


def _fid(entry: dict, sampler: str, steps: int):
    return _get(entry["fid"], f"{sampler}.{steps}")


def samplers_and_steps(points: list[dict], steps: int | None) -> tuple[list[str], int]:
    samplers = list(dict.fromkeys(s for p in points for s in p["fid"]))
    counts = sorted({int(k) for p in points for v in p["fid"].values() for k in v if k.isdigit()})  # not guided
    if not counts:
        raise InputError("no experiment with a σ_rel has FID metrics")
    if steps is None:
        steps = counts[-1]
    elif steps not in counts:
        raise InputError(f"no FID at {steps} steps in the sweep (have {', '.join(map(str, counts))})")
    return samplers, steps


def render(points: list[dict], references: list[dict], steps: int | None) -> str:
    if not points:
        return "No experiments with a σ_rel (metrics/ema.json) and FID found.\n"
    samplers, steps = samplers_and_steps(points, steps)
    lines = [f"## FID vs EMA length σ_rel ({steps} sampling steps; lower is better)", "",
             "| σ_rel | experiment | " + " | ".join(samplers) + " |", "|---:|---|" + "---:|" * len(samplers)]
    best = {s: min((f for p in points if (f := _fid(p, s, steps)) is not None), default=None) for s in samplers}
    for p in points:
        cells = []
        for s in samplers:
            f = _fid(p, s, steps)
            cells.append("–" if f is None else f"**{f:.3f}**" if f == best[s] else f"{f:.3f}")
        lines.append(f"| {p['sigma_rel']:g} ({p['source']}) | {p['experiment']} | " + " | ".join(cells) + " |")
    for r in references:
        cells = ["–" if (f := _fid(r, s, steps)) is None else f"{f:.3f}" for s in samplers]
        lines.append(f"| {r['label']} | {r['experiment']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(points: list[dict], references: list[dict], steps: int | None, figure: Path) -> None:
    """One line per sampler over σ_rel, the best point of each marked; references dashed."""
    from pipeline.rendering.figures import plot_sigma_rel

    samplers, steps = samplers_and_steps(points, steps)
    plot_sigma_rel(points, references, samplers, steps, figure)
