"""Every stage of dvc.yaml depends on exactly the project files it imports, so that nothing
goes stale silently and an edit re-runs only the stages that run the edited code (a sampler
edit never retrains). The stages, their commands and their deps are read from dvc.yaml, and
each stage's import closure is computed from its command (``python -m pipeline <command>``
through the dispatch in pipeline/cli.py): a new stage or module needs no change here, only
its deps in dvc.yaml."""

import ast
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ddpm", "pipeline")
# Folders a stage reads whole, not only the modules it imports: the log stage copies the
# ddpm package into the MLflow model it logs (code_paths), so any file of it changes that model.
READ_WHOLE = {"log": ["ddpm"]}


def module_file(name: str) -> Path | None:
    """The file of module ``name`` when it is one of the project's (a module or a package)."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported(nodes) -> set[str]:
    """Module names the import statements among ``nodes`` load (``from a import b`` loads ``a``,
    and ``a.b`` when ``b`` is a module)."""
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def command_name(fn: ast.FunctionDef) -> str | None:
    """The Typer command a function of pipeline/cli.py defines (None when it is no command)."""
    for dec in fn.decorator_list:
        if isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr == "command":
            if dec.args and isinstance(dec.args[0], ast.Constant):
                return dec.args[0].value
            return fn.name.replace("_", "-")
    return None


def cli_imports(command: str) -> set[str]:
    """What ``python -m pipeline <command>`` imports from pipeline/cli.py: its module-level imports,
    those of every function that is not a command (decorators, callbacks), and its command's."""
    tree = ast.parse((REPO / "pipeline/cli.py").read_text())
    nodes, found = list(tree.body), False
    for fn in [n for n in tree.body if isinstance(n, ast.FunctionDef)]:
        name = command_name(fn)
        if name is None or name == command:
            nodes += list(ast.walk(fn))
            found = found or name == command
    assert found, f"pipeline/cli.py has no command {command!r}"
    return imported(n for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom)))


def closure(command: str) -> set[str]:
    """The project files ``python -m pipeline <command>`` imports (package __init__ files included)."""
    todo = {"pipeline", "pipeline.__main__", *cli_imports(command)}
    files: set[Path] = {REPO / "pipeline/cli.py"}
    seen = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        if path is None:
            continue
        parts = name.split(".")
        todo |= {".".join(parts[:i]) for i in range(1, len(parts))}  # importing a.b runs a/__init__.py
        if path in files:
            continue
        files.add(path)
        if path != REPO / "pipeline/cli.py":
            todo |= imported(ast.walk(ast.parse(path.read_text())))
    return {str(f.relative_to(REPO)) for f in files}


def stage_command(cmd: str) -> str:
    tokens = shlex.split(cmd)
    i = next(i for i in range(len(tokens) - 1) if tokens[i] == "-m" and tokens[i + 1] == "pipeline")
    return tokens[i + 2]


def stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", list(stages()))
def test_stage_depends_on_exactly_what_it_imports(stage):
    spec = stages()[stage]
    command = stage_command(spec["cmd"])
    whole = READ_WHOLE.get(stage, [])
    expected = {f for f in closure(command) if not any(f.startswith(w + "/") for w in whole)} | set(whole)
    declared = {d for d in spec.get("deps", []) if d.split("/")[0] in PACKAGES}
    assert declared == expected, (f"stage {stage!r} (python -m pipeline {command}): "
                                  f"missing {sorted(expected - declared)}, not imported {sorted(declared - expected)}")


def test_a_sampler_edit_reaches_only_the_sampling_stages():
    users = {name for name, spec in stages().items()
             if "ddpm/samplers.py" in spec.get("deps", []) or "ddpm" in spec.get("deps", [])}
    sampling = {name for name, spec in stages().items() if stage_command(spec["cmd"]) == "sample"}
    assert sampling >= {"sample", "sample_guided"} and users == sampling | {"log"}, users
    assert not {"prepare", "classifier", "train"} & users
