"""A study (``python -m pipeline study run|report <file>``; not a DVC stage): experiments × seeds
run as DVC experiments, and claims about them judged over the seeds.

A study file (``studies/<name>.yaml``) names

- ``base``: the ``-S`` values every experiment starts from: a preset's (``preset: cpu``, the
  ``CPU_PRESET`` of the Makefile, where it is defined once) and/or ``set: [key=value, ...]``;
  without a base, params.yaml as it is;
- ``experiments``: name → its own ``-S`` values (``baseline: []`` for the base itself);
- ``seeds``: the training seeds (``seed``) every experiment runs with;
- ``max_runs`` (optional): how many runs ``study run`` may queue at once (default ``MAX_RUNS``, 100);
  more are refused in one line unless ``study run --yes`` confirms them;
- ``claims``: id → a comparison of one metric between two experiments (``metric: nll.bits_per_dim``,
  ``compare: cosine <= baseline``) or of two cells of one experiment (``within: baseline``,
  ``compare: fid.ddim.10 < fid.ddpm.10``), with the ``source`` it comes from, what it ``says`` in
  words and optional ``notes`` per verdict: prose for the results page that explains a verdict, where
  ``{experiment metric}`` stands for that mean ± std of the report.

Each experiment × seed is one DVC experiment named ``<study>-<experiment>-<seed>``, run with the
``-S`` values base + experiment + ``seed=<seed>`` (a key set twice: the later value). Before
anything is queued every run's params pass the `check` stage's checks (``pipeline.experiments.exp_run``,
as ``python -m pipeline exp-run`` does; once per experiment, since its seeds change ``seed`` alone), and
every key, metric and experiment a study names is checked: a bad study file is one line and nothing is
queued. ``study run`` says how many runs the study has at once, and how many it would queue.

A run is done when an experiment (of HEAD or of any commit that has experiments) has exactly its
params and none of its stages would run again with today's code and dvc.yaml
(``pipeline.experiments.dvc_api.stale_stages``: what DVC itself would re-run). So an edit of the
report re-runs, in the next ``study run``, the report stages only: everything before them comes
back from DVC's run-cache. ``study run`` queues only the runs not done nor already queued or
running, and a second ``study run`` does nothing. ``study report`` reads the done runs through
``pipeline.experiments.compare``'s reader (``pipeline.experiments.study_report``).

The metrics a claim can name, and where ``compare``'s reader has them, are ``CELL_METRICS`` and
``RUN_METRICS`` below: one table to adjust when metric keys are renamed.
"""

import json
import math
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ddpm.errors import InputError
from pipeline import yamlio
from pipeline.experiments import compare, verdicts
from pipeline.params.base import flatten

# <metric>.<sampler>.<steps>: a sample cell's metric, by the name compare's reader gives it in row["cells"][cell]
CELL_METRICS = {"fid": "fid", "kid": "kid", "precision": "precision", "recall": "recall", "isc": "isc",
                "class_accuracy": "class_accuracy"}
# a metric of the whole run → its field in a compare.experiment_rows row
RUN_METRICS = {"nll.bits_per_dim": "bits_per_dim", "fid.best": "best_fid",
               "classifier.test_accuracy": "classifier_accuracy"}
FORMATS = {"fid": "{:.2f}", "kid": "{:.4f}", "precision": "{:.3f}", "recall": "{:.3f}", "isc": "{:.2f}",
           "class_accuracy": "{:.3f}", "nll.bits_per_dim": "{:.3f}", "fid.best": "{:.2f}",
           "classifier.test_accuracy": "{:.4f}"}
CELL = re.compile(r"(?P<metric>[a-z_]+)\.(?P<sampler>[A-Za-z0-9_]+)\.(?P<steps>\d+)")
PRESETS = {"cpu": "CPU_PRESET"}  # preset name → the Makefile variable holding its -S values
SEED_KEY = compare.SEED_KEY
NAME = r"[A-Za-z][A-Za-z0-9_]*"
COMPARISON = re.compile(r"\s*(\S+)\s*(<=|>=|<|>)\s*(\S+)\s*")
PLACEHOLDER = re.compile(r"\{(" + NAME + r") ([A-Za-z0-9_.]+)\}")
MAX_RUNS = 100  # runs `study run` queues at once unless confirmed (--yes, or max_runs in the study file)


class StudyError(InputError):
    """A study file that cannot run: the message names the file and what is wrong."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseSpec(_Strict):
    preset: str | None = None  # a name in PRESETS
    set: list[str] = []  # -S values after the preset's


class ClaimSpec(_Strict):
    source: str
    says: str
    compare: str  # "left <op> right"
    within: str | None = Field(None, pattern=f"^{NAME}$")  # two cells (metrics) of this experiment
    metric: str | None = None  # one metric of two experiments
    notes: dict[str, str] = {}  # verdict → prose, with {experiment metric} placeholders


class SlurmSpec(_Strict):
    """What each run's SLURM job asks for (``--executor slurm``; ``pipeline.experiments.slurm.Resources``)."""
    partition: str | None = None
    gpus: int = Field(0, ge=0)
    cpus: int = Field(1, ge=1)
    time: str | None = Field(None, pattern=r"^(\d+-)?\d+(:\d\d){0,2}$")  # minutes, H:MM:SS or D-HH:MM:SS
    account: str | None = None
    mem: str | None = Field(None, pattern=r"^\d+[KMGT]?$")


class StudySpec(_Strict):
    description: str = ""
    base: BaseSpec = BaseSpec()
    slurm: SlurmSpec = SlurmSpec()
    seeds: list[int] = Field(min_length=1)
    experiments: dict[str, list[str]] = Field(min_length=1)
    claims: dict[str, ClaimSpec] = {}
    max_runs: int | None = Field(None, ge=1)  # how many runs `study run` may queue at once without --yes


@dataclass(frozen=True)
class Side:
    experiment: str
    metric: str


@dataclass(frozen=True)
class Claim:
    id: str
    source: str
    says: str
    left: Side
    op: str
    right: Side
    notes: dict[str, str]

    def text(self) -> str:
        """``fid.ddim.10 < fid.ddpm.10 in baseline`` or ``nll.bits_per_dim: cosine ≤ baseline``."""
        if self.left.experiment == self.right.experiment:
            return f"{self.left.metric} {verdicts.SYMBOLS[self.op]} {self.right.metric} in {self.left.experiment}"
        return f"{self.left.metric}: {self.left.experiment} {verdicts.SYMBOLS[self.op]} {self.right.experiment}"


@dataclass(frozen=True)
class Run:
    experiment: str
    seed: int
    name: str  # the DVC experiment's name
    overrides: tuple[str, ...]  # its -S values


@dataclass
class Study:
    name: str
    path: Path
    description: str
    base: list[str]  # the -S values of the base: the preset's, then base.set's
    preset: str | None
    base_set: list[str]
    seeds: list[int]
    experiments: dict[str, list[str]]
    claims: list[Claim]
    runs: list[Run]
    params: dict[str, dict] = field(default_factory=dict)  # run name → its params.yaml (shared parts: read only)
    max_runs: int = MAX_RUNS  # what `study run` queues at once without --yes
    slurm: dict = field(default_factory=dict)  # the study file's slurm: block (SlurmSpec's fields)

    def size(self) -> str:
        """``10000 runs (2 experiments × 5000 seeds)``."""
        return (f"{plural(len(self.runs), 'run')} ({plural(len(self.experiments), 'experiment')} × "
                f"{plural(len(self.seeds), 'seed')})")

    def too_many(self, n: int) -> str | None:
        """Why queueing ``n`` runs needs a confirmation, or None."""
        if n <= self.max_runs:
            return None
        return (f"it would queue {plural(n, 'run')}, more than the limit of {self.max_runs}"
                f"{'' if self.max_runs != MAX_RUNS else ' (the default)'}: each is a DVC experiment that trains "
                f"and samples; pass --yes, or set max_runs: {n} in {self.path}, to queue them")

    def metrics(self, experiment: str) -> list[str]:
        """What the report tabulates for an experiment: FID per cell of its sample matrix, bits/dim,
        and any other metric a claim or note names of it."""
        p = self.params[self.runs_of(experiment)[0].name]
        named = [m for c in self.claims for s in (c.left, c.right) if s.experiment == experiment for m in [s.metric]]
        named += [m for c in self.claims for text in c.notes.values() for e, m in PLACEHOLDER.findall(text)
                  if e == experiment]
        cells = [f"fid.{s}.{k}" for s in p["sample"]["samplers"] for k in sorted(p["sample"]["steps"])]
        return list(dict.fromkeys(cells + ["nll.bits_per_dim"] + named))

    def runs_of(self, experiment: str) -> list[Run]:
        return [r for r in self.runs if r.experiment == experiment]


def _key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def merge(*groups: list[str]) -> list[str]:
    """The ``-S`` values of ``groups`` in order, one per key: a key set again takes the later value."""
    out: dict[str, str] = {}
    for group in groups:
        for override in group:
            out[_key(override)] = override.strip()
    return list(out.values())


def preset_overrides(name: str, root: Path) -> list[str]:
    """A preset's ``-S`` values (``key=value``), read from the Makefile, where they are defined once."""
    if name not in PRESETS:
        raise StudyError(f"unknown preset {name!r}; the presets are {', '.join(PRESETS)}")
    rule = f"print-preset: ; @printf '%s\\n' $({PRESETS[name]})"
    try:
        out = subprocess.run(["make", "-s", "--no-print-directory", "--eval", rule, "print-preset"], cwd=root,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise StudyError(f"cannot read {PRESETS[name]} from {root / 'Makefile'} (needs make): {e}") from None
    words = out.split("\n")[:-1] if out.endswith("\n") else out.split("\n")
    if not words or len(words) % 2 or any(w != "-S" for w in words[::2]):
        raise StudyError(f"{PRESETS[name]} in {root / 'Makefile'} is not a list of -S key=value: {out.strip()!r}")
    return words[1::2]


def _known(key: str, flat: dict) -> bool:
    return key in flat or any(k.startswith(key + ".") for k in flat)


def parse_metric(metric: str) -> tuple[str, str | None, int | None]:
    """(``CELL_METRICS``/``RUN_METRICS`` name, sampler, steps); sampler and steps None for a run metric."""
    if metric in RUN_METRICS:
        return metric, None, None
    m = CELL.fullmatch(metric)
    if m and m["metric"] in CELL_METRICS:
        return m["metric"], m["sampler"], int(m["steps"])
    raise StudyError(f"unknown metric {metric!r}: one of <metric>.<sampler>.<steps> with <metric> in "
                     f"{', '.join(CELL_METRICS)} (e.g. fid.ddim.10), or {', '.join(RUN_METRICS)}")


def check_metric(metric: str, params: dict) -> None:
    """The metric names a cell that the experiment samples (its sample.samplers × sample.steps)."""
    _, sampler, steps = parse_metric(metric)
    if sampler is not None and (sampler not in params["sample"]["samplers"] or steps not in params["sample"]["steps"]):
        raise StudyError(f"unknown metric {metric!r}: its sample matrix is sample.samplers "
                         f"{params['sample']['samplers']} × sample.steps {params['sample']['steps']}")


def value(row: dict, metric: str) -> float | None:
    """The metric of one run, from a row of ``compare.experiment_rows``."""
    name, sampler, steps = parse_metric(metric)
    if sampler is None:
        v = row.get(RUN_METRICS[name])
    else:
        v = row["cells"].get(f"{sampler}-{steps}", {}).get(CELL_METRICS[name])
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def fmt(metric: str, v: float, scale: float | None = None) -> str:
    """``v`` with the metric's decimals (``FORMATS``), or more when ``scale`` (a spread, an interval's
    half-width) is below them: two significant digits of it, at most six decimals."""
    decimals = int(FORMATS[parse_metric(metric)[0]][3])
    if scale is not None and 0 < scale < 10 ** -decimals:
        decimals = min(6, math.ceil(-math.log10(scale)) + 1)
    return f"{v:.{decimals}f}"


def _schema_error(path: Path, e: ValidationError) -> StudyError:
    problems = [f"{'.'.join(str(p) for p in err['loc']) or 'top level'}: {err['msg']}" for err in e.errors()]
    return StudyError(f"{path}: " + "; ".join(problems))


def read(path: Path) -> StudySpec:
    if not path.is_file():
        raise StudyError(f"study file {path} does not exist")
    try:
        raw = yamlio.load(path.read_text())
    except yaml.YAMLError as e:
        raise StudyError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as e:
        raise _schema_error(path, e) from None


def _claim(path: Path, cid: str, spec: ClaimSpec, experiments: dict) -> Claim:
    where = f"{path}: claim {cid}"
    m = COMPARISON.fullmatch(spec.compare)
    if not m:
        raise StudyError(f"{where}: compare {spec.compare!r} is not '<left> <op> <right>' with op one of "
                         f"{', '.join(verdicts.OPERATORS)}")
    left, op, right = m.groups()
    if (spec.within is None) == (spec.metric is None):
        raise StudyError(f"{where}: give either within (two cells of one experiment) or metric (one metric "
                         "of two experiments)")
    if spec.within is not None:
        sides = (Side(spec.within, left), Side(spec.within, right))
    else:
        sides = (Side(left, spec.metric), Side(right, spec.metric))
    for side in sides:
        if side.experiment not in experiments:
            raise StudyError(f"{where}: experiment {side.experiment!r} is not in the study "
                             f"(its experiments: {', '.join(experiments)})")
    bad = [k for k in spec.notes if k not in verdicts.VERDICTS]
    if bad:
        raise StudyError(f"{where}: notes {bad} are not verdicts ({', '.join(verdicts.VERDICTS)})")
    return Claim(cid, spec.source, spec.says, sides[0], op, sides[1], dict(spec.notes))


def plan(path: Path, root: Path = Path(".")) -> Study:
    """The study of ``path``: its runs and claims, with every name checked but not the params yet."""
    spec = read(path)
    name = path.stem
    if not re.fullmatch(NAME, name):
        raise StudyError(f"{path}: a study's file name names its experiments: letters, digits and '_'")
    bad = [e for e in spec.experiments if not re.fullmatch(NAME, e)]
    if bad:
        raise StudyError(f"{path}: experiment names {bad} must be letters, digits and '_' (they name DVC experiments)")
    if len(set(spec.seeds)) != len(spec.seeds) or any(not 0 <= s < 2**63 for s in spec.seeds):
        raise StudyError(f"{path}: seeds must be distinct and in [0, 2^63)" + (
            f", got {spec.seeds}" if len(spec.seeds) <= 20 else ""))
    try:
        base = merge(preset_overrides(spec.base.preset, root) if spec.base.preset else [], spec.base.set)
    except StudyError as e:
        raise StudyError(f"{path}: base: {e}") from None
    for where, overrides in [("base", base)] + [(f"experiment {e}", o) for e, o in spec.experiments.items()]:
        for o in overrides:
            if "=" not in o or _key(o).startswith(("+", "~")) or not _key(o):
                raise StudyError(f"{path}: {where}: {o!r} is not key=value of an existing key (DVC's -S changes "
                                 "existing keys only)")
        if any(_key(o) == SEED_KEY for o in overrides):
            raise StudyError(f"{path}: {where} sets {SEED_KEY}; the study's seeds do")
    runs = [Run(e, s, f"{name}-{e}-{s}", tuple(merge(base, own, [f"{SEED_KEY}={s}"])))
            for e, own in spec.experiments.items() for s in spec.seeds]
    claims = [_claim(path, cid, c, spec.experiments) for cid, c in spec.claims.items()]
    return Study(name, path, " ".join(spec.description.split()), base, spec.base.preset, list(spec.base.set),
                 list(spec.seeds), dict(spec.experiments), claims, runs, max_runs=spec.max_runs or MAX_RUNS,
                 slurm=spec.slurm.model_dump())


def check(study: Study, params_path: Path = Path("params.yaml"), dvc_yaml: Path = Path("dvc.yaml")) -> Study:
    """Apply each experiment's ``-S`` values to params.yaml as DVC does and run the `check` stage's checks on
    the result (``pipeline.exp_run``); check every metric a claim or note names against the experiment's
    sample matrix. Fills ``study.params``; raises ``StudyError`` naming the experiment at fault.

    The runs of one experiment differ in ``seed`` alone (``plan`` refuses an experiment that sets it, and
    checks the seeds), so each experiment is applied and checked once, and its runs' params are derived from
    it: a study of 2 experiments × 5000 seeds costs two applications of ``-S``, not 10,000."""
    from pipeline.experiments.exp_run import apply
    from pipeline.params.schema import parse_params
    from pipeline.stages.check import verify

    if not params_path.is_file():
        raise StudyError(f"params file {params_path} does not exist")
    flat = flatten(yamlio.load(params_path.read_text()) or {})
    for where, overrides in [("base", study.base), *((f"experiment {e}", own) for e, own in study.experiments.items()),
                             ("the study's seeds", [f"{SEED_KEY}={study.seeds[0]}"])]:
        for o in overrides:
            if not _known(_key(o), flat):
                raise StudyError(f"{study.path}: {where}: unknown param key {_key(o)!r} (-S {o}; not in {params_path})")
    for e, own in study.experiments.items():
        runs = study.runs_of(e)
        source = f"{params_path} with the -S values of experiment {e}, seed {runs[0].seed}"
        try:
            applied = apply(params_path, merge(study.base, own, [f"{SEED_KEY}={runs[0].seed}"]))
            verify(parse_params(applied, source), dvc_yaml)  # the data set and the outputs: the same for every seed
        except InputError as err:
            raise StudyError(f"{study.path}: experiment {e} (seed {runs[0].seed}): {err}") from None
        for r in runs:  # as `-S seed=<seed>` would make it (shallow copies: read only)
            study.params[r.name] = {**applied, SEED_KEY: r.seed}
    for c in study.claims:
        for side in (c.left, c.right):
            _check_side(study, f"claim {c.id}", side)
        for verdict, text in c.notes.items():
            for experiment, metric in PLACEHOLDER.findall(text):
                if experiment not in study.experiments:
                    raise StudyError(f"{study.path}: claim {c.id}: note {verdict!r} names experiment {experiment!r}, "
                                     f"not in the study (its experiments: {', '.join(study.experiments)})")
                _check_side(study, f"claim {c.id}: note {verdict!r}", Side(experiment, metric))
    return study


def _check_side(study: Study, where: str, side: Side) -> None:
    try:
        check_metric(side.metric, study.params[study.runs_of(side.experiment)[0].name])
    except StudyError as e:
        raise StudyError(f"{study.path}: {where}: {e} of experiment {side.experiment}") from None


def load(path: Path, params_path: Path = Path("params.yaml"), dvc_yaml: Path = Path("dvc.yaml")) -> Study:
    """The study of ``path``, every name and every run's params checked (``plan``, then ``check``)."""
    return check(plan(path, Path(".")), params_path, dvc_yaml)


def _params_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def match(study: Study, exp_show: list, current) -> dict[str, tuple[str, str, dict]]:
    """Run name → (experiment name, rev, exp-show data) of the experiment or commit that did it: the
    same params and ``current(rev)`` (none of its stages would run again); one named as the run is
    preferred. Runs without one are missing. The workspace is no run of its own (a run leaves its
    results there, folded into it)."""
    candidates: dict[str, list] = {}
    for name, rev, data, _ in compare.runs(exp_show):
        params = ((data.get("params") or {}).get(compare.PARAMS_FILE) or {}).get("data")
        if rev == compare.WORKSPACE or not params or not data.get("metrics"):
            continue
        candidates.setdefault(_params_key(params), []).append((name, rev, data))
    found = {}
    for r in study.runs:
        options = [c for c in candidates.get(_params_key(study.params[r.name]), []) if current(c[1])]
        if options:
            found[r.name] = next((c for c in options if c[0] == r.name), options[0])
    return found


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def baselines(exp_show: list) -> dict[str, str]:
    """Experiment rev → the commit it was run on, from dvc exp show's nesting (commits hold their experiments)."""
    out = {}
    for commit in exp_show:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                out[rev.get("rev")] = commit.get("rev")
    return out


def row(name: str, rev: str, data: dict) -> dict | None:
    """One run's row, as ``compare``'s reader has it (None when it has no FID metrics)."""
    rows = compare.experiment_rows([{"name": name, "rev": rev, "data": data}], [])
    return rows[0] if rows else None
