"""``python -m pipeline study report``: a study's runs as mean ± std per experiment and metric, each
claim's difference of means with its 95% interval and verdict (``pipeline.verdicts``), and the
FID-vs-steps figure with error bars; written as ``reports/study-<name>.md``, ``.html`` (one file,
the figure embedded), ``.json`` (every number) and ``study-<name>-fid.png``, and optionally as the
generated section of the study in a Markdown page (``--readme``, between its begin and end lines;
for ``studies/papers.yaml`` the docs' results page ``docs/results/study.md``). The prose of that
section is the claims' ``notes`` in the study file, for the verdict the report reached, with
``{experiment metric}`` filled in from the report: the page types no number of its own."""

import datetime
import math
import shlex
from pathlib import Path

from pipeline.experiments import compare, verdicts
from pipeline.experiments.study import PLACEHOLDER, Study, StudyError, fmt, parse_metric, value
from pipeline.outputs import write_atomic, write_json
from pipeline.rendering import figures
from pipeline.rendering.documents import render
from pipeline.workspace import git_revision

TEMPLATES = ("study.md.j2", "study.html.j2", "study_readme.md.j2")

LABELS = {"nll.bits_per_dim": "bits/dim", "fid.best": "best FID", "classifier.test_accuracy": "extractor accuracy"}
METHOD = ("Each cell: mean ± sample standard deviation (n − 1) over the seeds. Each claim: the difference of the "
          "means, left − right, with its two-sided 95% interval from Welch's t (Welch–Satterthwaite degrees of "
          "freedom); **holds**: the interval lies entirely on the claimed side of 0; **reversed**: entirely on the "
          "other side; **not established**: it contains 0, or a side has fewer than two runs.")


def check_rulers(study: Study, rows: dict) -> None:
    """Refuse a study whose runs measured their FIDs with different rulers (``ddpm.ruler``): a mean over
    them, or a claim across them, compares FIDs on different scales."""
    by_ruler: dict[str, list[str]] = {}
    for name, row in rows.items():
        if row is not None:
            by_ruler.setdefault(row.get("ruler") or "?", []).append(name)
    if len(by_ruler) > 1:
        found = "; ".join(f"{ruler}: {', '.join(sorted(names))}" for ruler, names in sorted(by_ruler.items()))
        raise StudyError(f"study {study.name}: its runs measured FID with {len(by_ruler)} different rulers ({found}); "
                         "FIDs of different rulers are not comparable: run them again with one ruler (pin it: "
                         "fid.ruler) before reporting")


def label(metric: str) -> str:
    if metric in LABELS:
        return LABELS[metric]
    name, sampler, steps = parse_metric(metric)
    return f"{'FID' if name == 'fid' else name} {sampler}-{steps}"


def _stats(values: list[float]) -> dict:
    ms = compare.mean_std(values)
    return {"mean": ms[0] if ms else None, "std": ms[1] if ms else None, "n": len(values), "values": values}


def document(study: Study, done: dict, rows: dict, baselines: dict | None = None, commit: str | None = None,
             date: str | None = None) -> dict:
    """Everything the report shows, as plain data (also its JSON). ``baselines``: experiment rev → its commit."""
    runs = []
    for r in study.runs:
        name, rev, _ = done.get(r.name, (None, None, None))
        row = rows.get(r.name)
        runs.append({"name": r.name, "experiment": r.experiment, "seed": r.seed, "dvc_experiment": name, "rev": rev,
                     "baseline": (baselines or {}).get(rev, rev),
                     "values": {m: value(row, m) for m in study.metrics(r.experiment)} if row else {}})
    experiments = []
    for e, own in study.experiments.items():
        mine = [x for x in runs if x["experiment"] == e and x["values"]]
        experiments.append({"name": e, "overrides": own, "n": len(mine), "seeds": [x["seed"] for x in mine],
                            "stats": {m: _stats([x["values"][m] for x in mine if x["values"].get(m) is not None])
                                      for m in study.metrics(e)}})
    by_name = {e["name"]: e for e in experiments}
    claims = []
    for c in study.claims:
        left = by_name[c.left.experiment]["stats"][c.left.metric]["values"]
        right = by_name[c.right.experiment]["stats"][c.right.metric]["values"]
        d = verdicts.welch(left, right)
        v = verdicts.verdict(c.op, d)
        claims.append({"id": c.id, "source": c.source, "says": c.says, "text": c.text(), "op": c.op,
                       "left": {"experiment": c.left.experiment, "metric": c.left.metric},
                       "right": {"experiment": c.right.experiment, "metric": c.right.metric},
                       "difference": d.difference, "low": d.low, "high": d.high,
                       "df": d.df if d.df is None or math.isfinite(d.df) else None,  # ∞ (no spread): not JSON
                       "n_left": d.n_left, "n_right": d.n_right, "verdict": v,
                       "note": fill(c.notes[v], by_name) if v in c.notes else None})
    return {"study": study.name, "path": study.path.as_posix(), "description": study.description,
            "preset": study.preset, "base_set": study.base_set, "base": study.base, "seeds": study.seeds,
            "experiments": experiments, "claims": claims, "runs": runs,
            "missing": [x["name"] for x in runs if not x["values"]],
            "commit": commit or git_revision(), "date": date or datetime.date.today().isoformat()}


def pm(metric: str, stats: dict) -> str:
    if stats["mean"] is None:
        return "–"
    if stats["n"] < 2:
        return fmt(metric, stats["mean"])
    return f"{fmt(metric, stats['mean'], stats['std'])} ± {fmt(metric, stats['std'], stats['std'])}"


def fill(text: str, experiments: dict) -> str:
    """A note with each ``{experiment metric}`` replaced by that mean ± std (n when it is not the experiment's)."""
    def one(m):
        e = experiments[m[1]]
        stats = e["stats"][m[2]]
        return pm(m[2], stats) + (f" (n = {stats['n']})" if stats["n"] != e["n"] else "")

    return " ".join(PLACEHOLDER.sub(one, text).split())


def signed(metric: str, v: float, scale: float | None = None) -> str:
    text = fmt(metric, abs(v), scale)
    return ("+" if v > 0 else "−" if v < 0 else "") + text if float(text) else text


def difference(c: dict) -> str:
    m = c["left"]["metric"]
    if c["difference"] is None:
        return "–"
    if c["low"] is None:
        return f"{signed(m, c['difference'])} (no interval: fewer than two runs a side)"
    half = (c["high"] - c["low"]) / 2
    return f"{signed(m, c['difference'], half)} [{signed(m, c['low'], half)}, {signed(m, c['high'], half)}]"


def sets(overrides: list[str]) -> str:
    """``-S a=1 -S 'b=[1,2]'``, quoted as a shell needs it."""
    return shlex.join(a for o in overrides for a in ("-S", o))


def base_text(doc: dict) -> str:
    parts = ([f"the {doc['preset'].upper()} preset (`{doc['preset'].upper()}_PRESET` in the Makefile)"]
             if doc["preset"] else [])
    parts += [f"`{sets(doc['base_set'])}`"] if doc["base_set"] else []
    return " with ".join(parts) or "params.yaml as it is"


def _columns(doc: dict) -> list[str]:
    return list(dict.fromkeys(m for e in doc["experiments"] for m in e["stats"]))


def mean_table(doc: dict) -> dict:
    """The mean ± std table: its header and rows (Markdown inline: `code`)."""
    cols = _columns(doc)
    rows = []
    for e in doc["experiments"]:
        own = f"`{sets(e['overrides'])}`" if e["overrides"] else "the base"
        cells = []
        for m in cols:
            s = e["stats"].get(m)
            cells.append("" if s is None else pm(m, s) + (f" (n = {s['n']})" if s["n"] != e["n"] else ""))
        rows.append([f"{e['name']}: {own}", str(e["n"]), *cells])
    return {"header": ["experiment (-S)", "n", *(label(m) for m in cols)], "align": "|---|---:|" + "---:|" * len(cols),
            "rows": rows}


def verdict_table(doc: dict) -> dict:
    rows = [[c["says"], c["source"], f"`{c['text']}`", difference(c), f"{c['n_left']} + {c['n_right']}",
             f"**{c['verdict']}**"] for c in doc["claims"]]
    return {"header": ["claim", "source", "comparison", "difference (95% interval)", "n", "verdict"],
            "align": "|---|---|---|---|---|---|", "rows": rows}


def runs_table(doc: dict) -> dict:
    rows = [[r["name"], r["experiment"], str(r["seed"]), r["dvc_experiment"] or "(missing)", (r["rev"] or "")[:7]]
            for r in doc["runs"]]
    return {"header": ["run", "experiment", "seed", "DVC experiment", "rev"], "align": "|---|---|---:|---|---|",
            "rows": rows}


def provenance(doc: dict) -> str:
    n_exp = len(doc["experiments"])
    found = len(doc["runs"]) - len(doc["missing"])
    commits = sorted({r["baseline"][:7] for r in doc["runs"] if r.get("baseline")})
    when = (f"run and reported on commit {commits[0]}" if commits == [doc["commit"][:7]] else
            f"run on commit {', '.join(commits)}, reported on commit {doc['commit'][:7]} with the same code")
    return (f"{found} of {len(doc['runs'])} runs ({n_exp} experiments × seeds {', '.join(map(str, doc['seeds']))}) "
            f"on {base_text(doc)}, {when}, {doc['date']}"
            + (f"; missing: {', '.join(doc['missing'])}" if doc["missing"] else ""))


def context(doc: dict) -> dict:
    """What the templates show: the document and its tables."""
    return {"doc": doc, "method": METHOD, "provenance": provenance(doc), "verdicts": verdict_table(doc),
            "means": mean_table(doc), "runs": runs_table(doc),
            "claims": [{**c, "difference_text": difference(c)} for c in doc["claims"]]}


def render_markdown(doc: dict, figure: str) -> str:
    return render(TEMPLATES[0], **context(doc), figure=figure)


def render_html(doc: dict, figure: Path) -> str:
    return render(TEMPLATES[1], **context(doc), figure=figure)


def plot(doc: dict, figure: Path) -> None:
    """One panel per experiment: FID against sampling steps, a line per sampler, error bars ± std."""
    panels = []
    for e in doc["experiments"]:
        lines: dict[str, list] = {}
        for m, s in e["stats"].items():
            name, sampler, steps = parse_metric(m)
            if name == "fid" and sampler is not None and s["mean"] is not None:
                lines.setdefault(sampler, []).append((steps, s["mean"], s["std"]))
        panels.append({"name": e["name"], "n": e["n"], "lines": lines})
    figures.plot_study(panels, figure)


def outputs(name: str, out_dir: Path) -> list[Path]:
    """reports/study-<name>.{md,html,json} and its figure."""
    stem = out_dir / f"study-{name}"
    return [stem.with_suffix(".md"), stem.with_suffix(".html"), stem.with_suffix(".json"),
            stem.with_name(stem.name + "-fid.png")]


def write(doc: dict, out_dir: Path) -> list[Path]:
    """Write the report (``outputs``); returns their paths."""
    md, page, data, figure = paths = outputs(doc["study"], out_dir)
    plot(doc, figure)
    write_atomic(md, render_markdown(doc, figure.name))
    write_atomic(page, render_html(doc, figure))
    write_json(data, doc)
    return paths


def summary(doc: dict) -> list[str]:
    lines = [f"study {doc['study']}: {provenance(doc)}"]
    lines += [f"  {c['verdict']:>15}: {c['text']} ({c['says']}; {c['source']}): {difference(c)}" for c in doc["claims"]]
    return lines


def readme_command(study_path: Path, out_dir: Path, readme: Path) -> str:
    extra = "" if out_dir == Path("reports") else f" --out {out_dir.as_posix()}"
    return f"python -m pipeline study report {study_path.as_posix()}{extra} --readme {readme.as_posix()}"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- study {name}: begin", f"<!-- study {name}: end -->"


def render_readme(doc: dict, command: str, report: str) -> str:
    """The study's generated section of a page: its provenance, the verdicts with their notes, the means."""
    return render(TEMPLATES[2], **context(doc), command=command, report=report).rstrip("\n")


def check_readme(readme: Path, name: str) -> tuple[str, int, int]:
    """``readme``'s text and where the study's section begins and ends; a readme without it fails."""
    begin, end = markers(name)
    if not readme.is_file():
        raise FileNotFoundError(f"{readme} does not exist")
    text = readme.read_text()
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise StudyError(f"{readme} has no generated section for study {name}: put the lines "
                         f"'{begin} -->' and '{end}' where it belongs")
    return text, start, stop


def update_readme(readme: Path, doc: dict, command: str, report: str) -> None:
    """Replace what lies between the study's begin and end lines in ``readme``."""
    text, start, stop = check_readme(readme, doc["study"])
    head = text[:text.index("\n", start) + 1]  # the begin line stays as written
    write_atomic(readme, head + f"<!-- generated by `{command}`: edit {doc['path']}, not this section -->\n"
                 + render_readme(doc, command, report) + "\n" + text[stop:])
