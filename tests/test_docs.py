"""The docs site: its generated reference covers every params key and every command, subcommand and
option (enumerated here independently of the generator: from params.yaml, the params schema and the
Typer commands), the README stays a first screen whose links resolve, the papers study's results
page keeps its generated section, and ``mkdocs build --strict`` passes (a broken link, a missing page
or anchor fails it) with nothing loaded from the network."""

import importlib
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import typer
import yaml
from helpers import REPO, committed_params_text

from pipeline.cli import COMMANDS
from pipeline.params.schema import Params


def docs_site():
    spec = importlib.util.spec_from_file_location("docs_site", REPO / "scripts" / "docs_site.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- params
def schema_keys() -> set[str]:
    """Every dotted key the params schema accepts, every branch of every union included; the entries
    of a named section (``samplers``, ``guidance``) as ``<name>``."""
    schema = Params.model_json_schema()
    defs = schema["$defs"]

    def resolve(node):
        while "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[-1]]
        return node

    keys = set()

    def visit(node, prefix):
        node = resolve(node)
        for member in [resolve(m) for m in node.get("anyOf", node.get("oneOf", []))] or [node]:
            for name, sub in member.get("properties", {}).items():
                keys.add(prefix + name)
                visit(sub, prefix + name + ".")
            if isinstance(member.get("additionalProperties"), dict):
                keys.add(prefix + "<name>")
                visit(member["additionalProperties"], prefix + "<name>.")

    visit(schema, "")
    return keys


def yaml_keys(named: set[str]) -> set[str]:
    """Every key of params.yaml, groups included; the entries of a named section as ``<name>``."""
    keys = set()

    def visit(value, parts):
        if isinstance(value, dict):
            for k, v in value.items():
                here = parts + ["<name>" if len(parts) == 1 and parts[0] in named else str(k)]
                keys.add(".".join(here))
                visit(v, here)

    visit(yaml.safe_load(committed_params_text()), [])
    return keys


def reference_rows(markdown: str) -> dict[str, list[str]]:
    """key → the meanings of its rows in the generated params reference."""
    rows: dict[str, list[str]] = {}
    for line in markdown.splitlines():
        match = re.match(r"\| `([^`]+)` \|(.*)\|$", line)
        if match:
            rows.setdefault(match.group(1), []).append(match.group(2).rsplit(" | ", 1)[-1].strip())
    return rows


def test_the_params_reference_lists_every_key_with_its_meaning(tmp_path):
    (tmp_path / "params.yaml").write_text(committed_params_text())  # the committed defaults, also after `make repro`
    markdown = docs_site().params_markdown(tmp_path)
    rows = reference_rows(markdown)
    named = {"samplers", "guidance"}
    expected = schema_keys()
    assert {"train.ema.sigma_rel", "train.ema.inv_gamma", "samplers.<name>.eta", "guidance.<name>.interval",
            "fid.ruler"} <= expected, "the schema walk lost keys: fix this test"
    missing = sorted(expected - set(rows))
    assert not missing, f"params keys without an entry in the generated reference: {missing}"
    in_yaml = yaml_keys(named)
    assert not sorted(in_yaml - set(rows)), f"params.yaml keys without an entry: {sorted(in_yaml - set(rows))}"
    without = sorted(k for k in in_yaml if not any(m not in ("", "—") for m in rows[k]))
    assert not without, (f"params.yaml keys without a meaning (give each a trailing # comment in params.yaml): "
                         f"{without}")
    for key, value in (("train.lr", "`0.0002`"), ("classifier.steps", "`3000`")):  # params.yaml's values shown
        assert any(value in line for line in markdown.splitlines() if line.startswith(f"| `{key}` |")), key


# ----------------------------------------------------------------------------- the command line
def commands() -> dict[str, object]:
    """'python -m pipeline study run' → its command, for every command and subcommand."""
    out = {}

    def visit(path, command):
        out[path] = command
        for name, sub in (getattr(command, "commands", None) or {}).items():
            visit(f"{path} {name}", sub)

    for name, (module, attribute) in COMMANDS.items():
        visit(f"python -m pipeline {name}", typer.main.get_command(getattr(importlib.import_module(module),
                                                                             attribute)))
    return out


def test_the_cli_reference_lists_every_command_subcommand_and_option():
    markdown = docs_site().cli_markdown()
    found = commands()
    assert {"python -m pipeline study run", "python -m pipeline study report", "python -m pipeline ruler pin",
            "python -m pipeline train"} <= set(found), "the command walk lost commands: fix this test"
    # each command's section: from its usage line to the next heading
    sections = {}
    for match in re.finditer(r"^    (python -m pipeline [\w\- ]+?)(?: [A-Z_]+)*(?: \[OPTIONS\])?(?: COMMAND)?$"
                             r"(.*?)(?=^#)", markdown + "\n#", re.M | re.S):
        sections[match.group(1)] = match.group(2)
    missing = sorted(set(found) - set(sections))
    assert not missing, f"commands without an entry in the generated reference: {missing}"
    for path, command in found.items():
        for param in command.params:
            names = [param.name.upper()] if param.param_type_name == "argument" else param.opts
            for name in names:
                assert f"`{name}`" in sections[path], f"{path}: {name} has no entry in the generated reference"


# ----------------------------------------------------------------------------- README, study page
def test_the_readme_is_a_first_screen_whose_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200, "README.md is over 200 lines: move the detail into docs/"
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not re.match(r"\w+://", link)]
    assert local, "the README links no page"
    assert not [link for link in local if not (REPO / link).exists()], "README links to missing files"
    for words in ("make repro", "make test", "reports/report.html", "dvc exp show", "python -m pipeline ui"):
        assert words in text, f"the README no longer says {words!r}"


def test_the_study_results_page_keeps_its_generated_section():
    from pipeline.experiments import study_report

    page = REPO / "docs" / "results" / "study.md"
    study_report.check_readme(page, "papers")  # raises when the begin or end line is gone
    assert "--readme docs/results/study.md" in (REPO / "studies" / "papers.yaml").read_text()


# ----------------------------------------------------------------------------- the site
@pytest.mark.slow
def test_the_site_builds_strict_and_offline(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "WARNING" not in r.stderr, r.stderr[-3000:]
    pages = list(site.rglob("*.html"))
    assert len(pages) > 50
    for page in pages:
        html = page.read_text()
        remote = re.findall(r"<script[^>]+src=\"(?:https?:)?//[^\"]+|<link[^>]+href=\"(?:https?:)?//[^\"]+", html)
        assert not remote, f"{page.relative_to(site)} loads {remote[0]}"
        assert "fonts.googleapis" not in html and "fonts.gstatic" not in html, page
    params = (site / "reference" / "params.html").read_text()
    assert "train.ema.sigma_rel" in params and "guidance.&lt;name&gt;.interval" in params
    cli = (site / "reference" / "cli.html").read_text()
    assert "python -m pipeline study run" in cli
    assert "ddpm.samplers" in (site / "reference" / "api" / "ddpm" / "samplers.html").read_text()
    study = (site / "results" / "study.html").read_text()
    assert 'src="figures/study-papers-fid.png"' in study and (site / "results/figures/study-papers-fid.png").is_file()
    index = (site / "search" / "search_index.json").read_text()
    assert "ruler" in index and (site / "search" / "search_index.js").is_file()  # offline: the index inlined too
    assert (site / "assets" / "javascripts" / "iframe-worker-shim.js").is_file()
