"""Every stage of dvc.yaml depends on exactly the project files it imports, so that nothing goes
stale silently and an edit re-runs only the stages that run the edited code (a sampler edit never
retrains). The stages, their commands and their deps are read from dvc.yaml, and each stage's
import closure is computed from its command (``python -m pipeline.stages.<stage>``) by
``pipeline.experiments.deps``: a new stage or module needs no change here, only its deps in
dvc.yaml (``python -m pipeline deps --write``)."""

import pytest

from helpers import REPO
from pipeline.experiments import deps

STAGES = {s.name: s for s in deps.stages(REPO)}


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_depends_on_exactly_what_it_imports(stage):
    spec = STAGES[stage]
    expected = deps.expected(REPO, spec)
    assert set(spec.declared) == expected, (f"stage {stage!r} (python -m {spec.module}): "
                                            f"missing {sorted(expected - spec.declared)}, "
                                            f"not imported {sorted(spec.declared - expected)}")


def test_every_stage_runs_its_own_module():
    """A stage's command is its own module, not the command line that holds every command."""
    for name, spec in STAGES.items():
        assert spec.module.startswith("pipeline.stages."), (name, spec.module)
        assert "pipeline/cli.py" not in deps.closure(REPO, spec.module), name


def test_a_sampler_edit_reaches_only_the_sampling_stages():
    users = {name for name, spec in STAGES.items() if spec.reads("ddpm/samplers.py")}
    sampling = {name for name, spec in STAGES.items() if spec.module == "pipeline.stages.sample"}
    assert sampling >= {"sample", "sample_guided"} and users == sampling | {"log"}, users
    assert not {"prepare", "classifier", "train"} & users


def test_the_closure_follows_imports_inside_functions_and_templates(tmp_path):
    """Imports inside a function count (they run when it does), and so do the templates a module renders
    and those they extend."""
    (tmp_path / "pipeline/rendering/templates").mkdir(parents=True)
    (tmp_path / "ddpm").mkdir()
    for f in ("pipeline/__init__.py", "pipeline/rendering/__init__.py", "ddpm/__init__.py", "ddpm/b.py"):
        (tmp_path / f).write_text("")
    (tmp_path / "pipeline/a.py").write_text("TEMPLATES = ('x.md.j2',)\ndef f():\n    from ddpm import b\n")
    (tmp_path / "pipeline/rendering/templates/x.md.j2").write_text('{% extends "base.md.j2" %}')
    (tmp_path / "pipeline/rendering/templates/base.md.j2").write_text("")
    assert deps.closure(tmp_path, "pipeline.a") == {
        "pipeline/__init__.py", "pipeline/a.py", "ddpm/__init__.py", "ddpm/b.py",
        "pipeline/rendering/templates/x.md.j2", "pipeline/rendering/templates/base.md.j2"}


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports (anywhere in it, as the closures count them)."""
    import ast

    graph = {}
    for f in deps.source_files(REPO):
        if not f.endswith(".py"):
            continue
        path = REPO / f
        name = deps.module_name(REPO, path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = {deps.module_name(REPO, p) for m in deps.imported(ast.parse(path.read_text()), package)
                   if (p := deps.module_file(REPO, m)) is not None}
        graph[name] = targets - {name}
    return graph


def test_no_import_circles():
    """No two modules import each other, however indirectly (imports inside functions count)."""
    graph, circles = import_graph(), []

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph.get(m, ())
        return seen

    for module in graph:
        if module in reach(module):
            circles.append(module)
    assert not circles, f"modules on an import circle: {sorted(circles)}"


def test_the_library_imports_no_glue():
    """ddpm is tensors in, tensors out: it never imports the pipeline, YAML, Typer, DVC, MLflow or a benchmark
    peer (diffusers)."""
    import ast

    forbidden = ("pipeline", "benchmarks", "yaml", "typer", "click", "dvc", "mlflow", "diffusers")
    for f in deps.source_files(REPO):
        if f.startswith("ddpm/") and f.endswith(".py"):
            names = deps.imported(ast.parse((REPO / f).read_text()), "ddpm")
            bad = sorted(n for n in names if n.split(".")[0] in forbidden)
            assert not bad, (f, bad)


@pytest.mark.parametrize("stage", ["check", "log"])
def test_the_stages_of_every_run_start_without_torch(stage):
    """check and log run in every experiment (always changed, also when every other stage is restored from the
    run-cache): check reads params.yaml, the data set's files and a pinned ruler's records, log writes files and
    talks to MLflow; neither pays torch's seconds of import."""
    import subprocess
    import sys

    code = f"import sys, pipeline.stages.{stage}; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True)
    chain = [line for line in r.stderr.splitlines() if line.rstrip().endswith((" torch", "ddpm.files", "ddpm.data"))]
    assert r.stdout.strip() == "False", chain  # its importers, from -X importtime
