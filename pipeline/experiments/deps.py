"""What a stage runs, and what an edit re-runs: the code dependencies of ``dvc.yaml``.

Every stage's command is ``python -m <module> ...``. Its **code dependencies** are the project
files that command imports: the module, every project module it imports (at module level or
inside a function: the AST is read, nothing is imported), the ``__init__.py`` of every package
on the way, and the templates a module names in ``TEMPLATES`` (under
``pipeline/rendering/templates/``, with those they extend or include). ``dvc.yaml`` must declare
exactly these (``check``): a file missing there lets the stage go stale silently, an extra one
re-runs it for nothing. ``write`` puts them there.

The **edit cost** of a file (``blast_radius``) is the number of stage runs whose declared
dependencies include it (a folder dependency includes every file under it), with the matrix
stages expanded by the params as DVC expands them (``sample@ddim-10`` …): what ``dvc repro``
re-runs after a one-line edit of that file, stages that run every time (``always_changed``)
included. Weighted by lines, it is the share of the pipeline that a random line's edit re-runs.

``python -m pipeline deps`` prints the table; ``--check`` fails when ``dvc.yaml`` declares
other code dependencies than the imports; ``--write`` rewrites them. Not a DVC stage.
"""

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import typer

from pipeline.stages._cli import stage_app

PACKAGES = ("ddpm", "pipeline")
SOURCE_SUFFIXES = (".py", ".j2")  # code: modules and the rendering templates
TEMPLATES_DIR = "pipeline/rendering/templates"
TEMPLATE_REFS = re.compile(r"{%-?\s*(?:extends|include|import|from)\s+[\"']([^\"']+)[\"']")
# Folders a stage reads whole, not only the modules it imports: the log stage copies the ddpm
# package into the MLflow model it logs (code_paths), so any file of it changes that model.
READ_WHOLE = {"log": ["ddpm"]}


# ----------------------------------------------------------------------------- import closures
def module_file(root: Path, name: str) -> Path | None:
    """The file of module ``name`` when it is one of the project's (a module or a package)."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported(tree: ast.AST, package: str) -> set[str]:
    """Module names the import statements of ``tree`` load, wherever they stand (``from a import b``
    loads ``a``, and ``a.b`` when ``b`` is a module; relative imports resolved within ``package``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def named_templates(tree: ast.Module) -> list[str]:
    """The string literals of a module-level ``TEMPLATES = (...)``: the templates the module renders."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "TEMPLATES" for t in node.targets):
            value = ast.literal_eval(node.value)
            return [value] if isinstance(value, str) else list(value)
    return []


def template_closure(root: Path, names: list[str]) -> set[str]:
    """The template files ``names`` and those they extend, include or import, as paths from ``root``."""
    found, todo = set(), list(names)
    while todo:
        name = todo.pop()
        path = f"{TEMPLATES_DIR}/{name}"
        if path in found:
            continue
        if not (root / path).is_file():
            raise FileNotFoundError(f"template {name} (named in TEMPLATES) is not in {TEMPLATES_DIR}")
        found.add(path)
        todo += TEMPLATE_REFS.findall((root / path).read_text())
    return found


def closure(root: Path, module: str) -> set[str]:
    """The project files ``python -m <module>`` reads as code, as paths from ``root``."""
    todo, files, seen = {module}, set(), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo |= {".".join(parts[:i]) for i in range(1, len(parts))}  # importing a.b runs a/__init__.py
        path = module_file(root, name)
        if path is None or path in files:
            continue
        files.add(path)
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        todo |= imported(tree, package)
        files |= {root / t for t in template_closure(root, named_templates(tree))}
    if (main := module_file(root, module)) is not None and main.name == "__init__.py":  # python -m package
        files |= {root / p for p in closure(root, f"{module}.__main__")}
    return {f.relative_to(root).as_posix() for f in files}


# ----------------------------------------------------------------------------- the stages
@dataclass(frozen=True)
class Stage:
    name: str  # as dvc.yaml names it (a matrix stage once, not per cell)
    module: str  # what its command runs: python -m <module>
    runs: int  # stage runs: 1, or the cells of its matrix with these params
    always_changed: bool
    declared: frozenset[str]  # its deps under ddpm/ and pipeline/, as written (files or folders)

    def reads(self, path: str) -> bool:
        return any(path == d or path.startswith(d.rstrip("/") + "/") for d in self.declared)


def command_module(cmd: str) -> str:
    """``pipeline.stages.sample`` of ``python -m pipeline.stages.sample --steps 10``."""
    tokens = cmd.split()
    for i, token in enumerate(tokens[:-1]):
        if token == "-m":
            return tokens[i + 1]
    raise ValueError(f"not a `python -m <module>` command: {cmd!r}")


def _lookup(params: dict, dotted: str):
    for part in dotted.split("."):
        params = params[part]
    return params


def matrix_size(matrix: dict, params: dict) -> int:
    """The cells of a ``matrix`` whose axes are ``${key}`` references into ``params`` or lists."""
    n = 1
    for axis in matrix.values():
        if isinstance(axis, str) and axis.startswith("${") and axis.endswith("}"):
            axis = _lookup(params, axis[2:-1])
        n *= len(axis)
    return n


def stages(root: Path) -> list[Stage]:
    from pipeline import yamlio

    spec = yamlio.load((root / "dvc.yaml").read_text())["stages"]
    params = yamlio.load((root / "params.yaml").read_text())
    out = []
    for name, s in spec.items():
        declared = frozenset(d for d in s.get("deps", []) if isinstance(d, str) and d.split("/")[0] in PACKAGES)
        out.append(Stage(name, command_module(s["cmd"]), matrix_size(s["matrix"], params) if "matrix" in s else 1,
                         bool(s.get("always_changed")), declared))
    return out


def expected(root: Path, stage: Stage) -> set[str]:
    """The code dependencies ``stage`` should declare: its command's closure, with READ_WHOLE folders whole."""
    whole = READ_WHOLE.get(stage.name, [])
    return {f for f in closure(root, stage.module) if not any(f.startswith(w + "/") for w in whole)} | set(whole)


def mismatches(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Stage → (imported but not declared, declared but not imported), for the stages where they differ."""
    out = {}
    for stage in stages(root):
        want = expected(root, stage)
        if want != set(stage.declared):
            out[stage.name] = (sorted(want - stage.declared), sorted(stage.declared - want))
    return out


def write(root: Path) -> list[str]:
    """Rewrite the code dependencies of every stage in ``dvc.yaml`` (sorted, before its other deps;
    comments and layout kept by ruamel.yaml, which DVC itself uses); the stages changed."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    path = root / "dvc.yaml"
    doc = yaml.load(path.read_text())
    changed = []
    for stage in stages(root):
        deps = doc["stages"][stage.name]["deps"]
        want = sorted(expected(root, stage))
        others = [d for d in deps if not (isinstance(d, str) and d.split("/")[0] in PACKAGES)]
        if [d for d in deps if d not in others] != want:
            deps[:] = want + others
            changed.append(stage.name)
    if changed:
        from io import StringIO

        text = StringIO()
        yaml.dump(doc, text)
        path.write_text(text.getvalue())
    return changed


# ----------------------------------------------------------------------------- the edit cost
def source_files(root: Path) -> list[str]:
    """Every code file under the packages (modules and templates), as paths from ``root``."""
    return sorted(p.relative_to(root).as_posix() for package in PACKAGES for p in (root / package).rglob("*")
                  if p.is_file() and p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts)


@dataclass(frozen=True)
class Cost:
    path: str
    lines: int
    runs: int  # stage runs an edit of the file re-runs
    stages: tuple[str, ...]  # the stages, by dvc.yaml's name


def blast_radius(root: Path) -> tuple[list[Cost], int]:
    """(the cost of every source file, the stage runs of the whole pipeline)."""
    all_stages = stages(root)
    total = sum(s.runs for s in all_stages)
    costs = []
    for path in source_files(root):
        users = [s for s in all_stages if s.reads(path)]
        lines = len((root / path).read_text().splitlines())
        costs.append(Cost(path, lines, sum(s.runs for s in users), tuple(s.name for s in users)))
    return costs, total


def shares(costs: list[Cost], total: int) -> tuple[float, float]:
    """(the line-weighted share of stage runs an edit re-runs, the plain mean over files)."""
    lines = sum(c.lines for c in costs)
    weighted = sum(c.lines * c.runs for c in costs) / (lines * total)
    return weighted, sum(c.runs for c in costs) / (len(costs) * total)


def table(costs: list[Cost], total: int) -> str:
    """The blast-radius table in Markdown, most expensive first, with the two shares."""
    weighted, mean = shares(costs, total)
    lines = [f"| file | lines | stage runs re-run (of {total}) | stages |", "|---|---:|---:|---|"]
    for c in sorted(costs, key=lambda c: (-c.runs, c.path)):
        lines.append(f"| `{c.path}` | {c.lines} | {c.runs} | {', '.join(c.stages) or '—'} |")
    lines += ["", f"Line-weighted share of stage runs an edit re-runs: **{weighted:.3f}**; "
                  f"mean over the {len(costs)} files: {mean:.3f}."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the command
def main(check: bool = False, fix: bool = False, root: Path = Path(".")) -> None:
    from pipeline.errors import OutputError

    if fix:
        changed = write(root)
        print(f"deps: code dependencies rewritten in dvc.yaml for {', '.join(changed)}" if changed else
              "deps: dvc.yaml's code dependencies are the stages' imports already")
    wrong = mismatches(root)
    if check and wrong:
        lines = [f"{stage}: missing {missing or '[]'}, not imported {extra or '[]'}"
                 for stage, (missing, extra) in wrong.items()]
        raise OutputError("dvc.yaml's code dependencies differ from the stages' imports "
                          "(python -m pipeline deps --write fixes them): " + "; ".join(lines))
    costs, total = blast_radius(root)
    print(table(costs, total), end="")


app = stage_app()


@app.command()
def deps(check: bool = typer.Option(False, "--check", help="fail when dvc.yaml's code dependencies are not the "
                                                            "stages' imports"),
         fix: bool = typer.Option(False, "--write", help="rewrite dvc.yaml's code dependencies from the imports")):
    """What an edit re-runs: every code file with the stage runs whose dependencies include it (the blast-radius
    table), from dvc.yaml and params.yaml. Not a DVC stage."""
    from pipeline.stages._cli import one_line

    one_line(main)(check, fix)
