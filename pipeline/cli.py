"""The command line: ``python -m pipeline <command> [options]`` (or the console script
``ddpm-pipeline``, which ``make`` installs). Every command lives in its own module, which is
imported only when that command runs: ``COMMANDS`` names the module of each, and the help of the
list is read from the module's source, not imported. So running a stage (dvc.yaml runs each as
``python -m pipeline.stages.<stage>``, the same command) never loads this file or another
command, and an edit here or of a command that is no stage re-runs no stage.

``--debug`` (or ``DDPM_DEBUG=1``) shows the traceback of an expected error instead of its
one-line message; ``--version`` prints the version.
"""

import ast
import functools
import importlib
import importlib.util
from pathlib import Path

import click
import typer
from typer.core import TyperGroup

# name → (module, the name of its Typer app): the DVC stages first, in the order of the pipeline
STAGES = {name: (f"pipeline.stages.{name.replace('-', '_')}", "app") for name in (
    "check", "prepare", "classifier", "train", "ema", "sample", "fid-ref", "fid-floor", "fid", "nll", "denoise",
    "report", "log")}
COMMANDS = {**STAGES,
            "exp-show": ("pipeline.experiments.exp_show", "app"),
            "compare": ("pipeline.experiments.compare", "app"),
            "exp-run": ("pipeline.experiments.exp_run", "app"),
            "study": ("pipeline.experiments.study_commands", "app"),
            "deps": ("pipeline.experiments.deps", "app"),
            "sync": ("pipeline.commands.sync", "app"),
            "export": ("pipeline.commands.export", "app"),
            "ruler": ("pipeline.commands.ruler", "app"),
            "ui": ("pipeline.commands.ui", "app")}


@functools.cache
def short_help(module: str) -> str:
    """The first line of the help of ``module``'s command, read from its source (nothing is imported; once
    per process)."""
    origin = importlib.util.find_spec(module).origin
    tree = ast.parse(Path(origin).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr in ("command", "callback")
                for d in node.decorator_list):
            doc = ast.get_docstring(node)
            if doc:
                return doc.split("\n\n")[0].replace("\n", " ")
    for node in tree.body:  # a group: the help it was made with
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            for kw in node.value.keywords:
                if kw.arg == "help":
                    try:
                        return ast.literal_eval(kw.value)
                    except ValueError:
                        pass
    return ""


class LazyCommand(click.Command):
    """A command whose module is imported when it runs (or shows its own help)."""

    def __init__(self, name: str, module: str, attribute: str):
        super().__init__(name, short_help=short_help(module))
        self.module, self.attribute, self._real = module, attribute, None

    def real(self) -> click.Command:
        if self._real is None:
            app = getattr(importlib.import_module(self.module), self.attribute)
            self._real = typer.main.get_command(app)
            self._real.name = self.name
        return self._real

    def make_context(self, info_name, args, parent=None, **extra):
        return self.real().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        return self.real().invoke(ctx)

    def get_params(self, ctx):
        return self.real().get_params(ctx)

    def get_help(self, ctx):
        return self.real().get_help(ctx)

    def shell_complete(self, ctx, incomplete):
        return self.real().shell_complete(ctx, incomplete)


class Commands(TyperGroup):
    """The group of ``COMMANDS``, each a ``LazyCommand``."""

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, name: str):
        if name not in COMMANDS:
            return None
        return LazyCommand(name, *COMMANDS[name])


def version() -> str:
    """The installed package's version, or pyproject.toml's in a checkout that is not installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version("ddpm-pipeline")
    except importlib.metadata.PackageNotFoundError:
        import tomllib

        with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
            return tomllib.load(f)["project"]["version"]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ddpm-pipeline {version()}")
        raise typer.Exit()


# rich_markup_mode=None: plain help, as every command's (pipeline.stages._cli.stage_app says why)
app = typer.Typer(cls=Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="The DDPM experiment pipeline: one command per DVC stage (dvc.yaml), and the commands "
                       "around them.")


@app.callback()
def _process(debug: bool = typer.Option(False, "--debug", envvar="DDPM_DEBUG",
                                        help="show the traceback of an expected error instead of its one-line message"),
             _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                           expose_value=False, help="print the version and exit")) -> None:
    """Before any command: --debug applies to it."""
    from pipeline.stages._cli import FORCED

    FORCED["debug"] = debug


def main() -> None:
    """The console script ``ddpm-pipeline``."""
    app()


if __name__ == "__main__":
    main()
