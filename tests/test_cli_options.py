"""The command line behaves like a Click CLI: --version, --debug (the traceback of an expected
error), choices checked by the parser (a usage error, exit 2, naming the choices), and only the
project's own errors turned into one line."""

import tomllib

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
