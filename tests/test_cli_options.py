"""The command line behaves like a Click CLI: --version, --debug (the traceback of an expected
error), choices checked by the parser (a usage error, exit 2, naming the choices), and only the
project's own errors turned into one line."""

import tomllib

import pytest

from tiny import REPO, cli, errors


def test_version_is_the_package_version(tmp_path):
    result = cli(tmp_path, "--version")
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert result.exit_code == 0 and result.stdout.strip() == f"ddpm-pipeline {version}"


def test_expected_error_is_one_line_unless_debug(tmp_path):
    plain = cli(tmp_path, "prepare", "--params", "missing.yaml")
    assert plain.exit_code == 1 and errors(plain) == ["error: params file missing.yaml does not exist"]
    assert plain.exception is None or isinstance(plain.exception, SystemExit)
    for args, env in ((["--debug"], None), ([], {"DDPM_DEBUG": "1"})):
        debug = cli(tmp_path, *args, "prepare", "--params", "missing.yaml", env=env)
        assert debug.exit_code == 1 and errors(debug) == []
        assert type(debug.exception).__name__ == "ParamsError" and "missing.yaml" in str(debug.exception)


def test_bad_resume_is_a_usage_error_naming_the_choices(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models/new.pt").write_bytes(b"produced by an earlier run")
    result = cli(tmp_path, "train", "--resume", "sometimes", "--out", "models/new.pt")
    assert result.exit_code == 2 and "--resume" in result.output
    assert all(f"'{c}'" in result.output for c in ("auto", "never", "require"))
    assert (tmp_path / "models/new.pt").read_bytes() == b"produced by an earlier run"
    assert "auto|never|require" in cli(tmp_path, "train", "--help").output


@pytest.mark.parametrize("command", ["classifier", "train", "sample", "fid-ref", "fid-floor", "fid", "nll",
                                     "denoise"])
def test_bad_device_is_a_usage_error(tmp_path, command):
    result = cli(tmp_path, command, "--device", "gpu")
    assert result.exit_code == 2 and "'gpu' is not one of auto, cpu, cuda, cuda:N" in result.output
    assert "cuda:N" in cli(tmp_path, command, "--help").output


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory"), ValueError("a bug's ValueError"),
                                   FloatingPointError("a bug's overflow")])
def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, error):
    """Only the project's errors become one line: a shape error or CUDA OOM from inside a stage propagates."""
    from pipeline.stages import prepare

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(prepare.base, "load", fail)
    result = cli(tmp_path, "prepare")
    assert result.exit_code != 0 and result.exception is error and errors(result) == []


def test_a_project_error_from_inside_a_stage_is_one_line(tmp_path, monkeypatch):
    from pipeline.params.base import ParamsError
    from pipeline.stages import prepare

    def fail(*args, **kwargs):
        raise ParamsError("data.root: not a folder")

    monkeypatch.setattr(prepare.base, "load", fail)
    result = cli(tmp_path, "prepare")
    assert result.exit_code == 1 and errors(result) == ["error: data.root: not a folder"]
    assert isinstance(result.exception, SystemExit)


def commands():
    """(words, click command) of every command and subcommand of ``python -m pipeline``."""
    from pipeline.cli import COMMANDS, LazyCommand

    def walk(command, words):
        yield words, command
        for name, sub in (getattr(command, "commands", None) or {}).items():
            yield from walk(sub, [*words, name])

    for name, (module, attribute) in COMMANDS.items():
        yield from walk(LazyCommand(name, module, attribute).real(), [name])


def test_every_option_says_what_it_is_and_no_flag_shows_a_type(tmp_path, figure):
    """Every option and argument of every command has help, and `--help` prints a flag bare (`--dry`, not
    `--dry <bool>`: Typer's rich help did, stage_app turns it off), the umbrella's too."""
    seen = 0
    for words, command in commands():
        for param in command.params:
            assert (getattr(param, "help", None) or "").strip(), (words, param.opts)
            seen += 1
        text = cli(tmp_path, *words, "--help").output
        assert "<bool>" not in text and "--help  " in text, (words, text)
    top = cli(tmp_path, "--help").output
    assert "<bool>" not in top and "--debug " in top and "--version " in top
    figure(f"options with help: {seen}")
