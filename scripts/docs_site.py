"""The docs site's generated pages, and the MkDocs hooks that add them (``mkdocs.yml``: ``hooks:``).

What the code already says is generated from it at build time, so that the site cannot drift:

- ``reference/params.md``: every key of params.yaml, with its type, bounds, default (the params
  schema, ``pipeline.params.schema.Params``), its value in params.yaml and its meaning (the key's
  trailing ``# ...`` comment in params.yaml, else the comment of its field in the schema's source);
- ``reference/cli.md``: every command, subcommand and option of ``python -m pipeline`` (Typer);
- ``reference/edit-cost.md``: what an edit of each file re-runs (``pipeline.experiments.deps``);
- ``reference/api/...``: one page per module of ``ddpm/`` and ``pipeline/`` (mkdocstrings reads
  the docstrings), with an index of the modules per package;
- ``index.md`` (the README, its links made the site's) and ``changelog.md`` (CHANGELOG.md);
- the figures the results pages show, copied from where the pipeline writes them (``FIGURES``), and
  the vendored script that lets search run from ``file://`` (``ASSETS``; see vendor/iframe-worker).

Markers in a page are replaced too: ``<!-- generated: modules PACKAGE -->`` by the table of a
package's modules, ``<!-- generated: edit-cost summary -->`` by the edit cost's two shares.

``python scripts/docs_site.py params|cli|edit-cost`` prints a generated page.
"""

import ast
import importlib
import io
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's packages, not another installed copy's
    sys.path.insert(0, str(ROOT))

# site path → the file in the repository it is copied from (the results pages show them)
FIGURES = {
    "results/figures/study-papers-fid.png": "reports/study-papers-fid.png",
    "results/figures/study-papers.html": "reports/study-papers.html",
    "results/figures/h200-2026-12-04-grids.png": "benchmarks/results/h200-2026-12-04/run2-grids.png",
}
# site path → the vendored file the theme loads from there (mkdocs.yml's extra.polyfills names it)
ASSETS = {"assets/javascripts/iframe-worker-shim.js": "vendor/iframe-worker/shim.js"}
API_PACKAGES = {"ddpm": "Library API (ddpm)", "pipeline": "Pipeline API (pipeline)"}
NAMED = "<name>"  # a named entry of a section that holds named entries (samplers.<name>.kind)


# ============================================================================= params.yaml
def yaml_comments(path: Path) -> tuple[dict[str, str], str]:
    """({dotted key: its comment}, the file's leading comment) of a params file. A key's comment is
    the ``# ...`` at the end of its line, continued by comment-only lines right below it that are
    indented deeper than the key."""
    comments: dict[str, str] = {}
    header: list[str] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the open mappings
    last: str | None = None  # the key a comment-only line may continue
    last_indent = 0
    seen_key = False
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        indent = len(raw) - len(raw.lstrip())
        if not stripped:
            last = None
            continue
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if not seen_key:
                header.append(text)
            elif last is not None and indent > last_indent:
                comments[last] = (comments.get(last, "") + " " + text).strip()
            continue
        match = re.match(r"([\w\-+]+):(.*)$", stripped)
        if not match:
            last = None
            continue
        seen_key = True
        name, rest = match.groups()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [name])
        stack.append((indent, name))
        comment = _trailing_comment(rest)
        if comment:
            comments[key] = comment
        last, last_indent = key, indent
    return comments, " ".join(header)


def _trailing_comment(rest: str) -> str:
    """The comment of a YAML line's value part (a ``#`` after whitespace, outside quotes)."""
    quote = None
    for i, c in enumerate(rest):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or rest[i - 1] in " \t"):
            return rest[i + 1:].strip()
    return ""


def source_comments(cls: type) -> dict[str, str]:
    """{field: its comment} from the source of ``cls`` and its bases: the comment at the end of the
    field's line (``# type: ignore`` left out) or, failing that, the comment lines right above it."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        module = sys.modules.get(klass.__module__)
        if module is None or not getattr(module, "__file__", None) or klass.__module__ == "builtins":
            continue
        try:
            source = Path(module.__file__).read_text()
        except OSError:
            continue
        tree = ast.parse(source)
        node = next((n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == klass.__name__), None)
        if node is None:
            continue
        lines = source.splitlines()
        by_line = _comments_by_line(source)
        fields = [s for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
        for i, stmt in enumerate(fields):
            text = by_line.get(stmt.end_lineno, "")
            row = stmt.lineno - 1
            above = []
            while row > 0 and lines[row - 1].strip().startswith("#"):
                above.insert(0, lines[row - 1].strip().lstrip("#").strip())
                row -= 1
            if i > 0 or len(fields) == 1:  # above the first of several fields: a note on the class
                text = text or " ".join(above)
            if True:
                if text:
                    out[stmt.target.id] = text
    return out


def _comments_by_line(source: str) -> dict[int, str]:
    """{line number: the comment at its end}, ``type: ignore[...]`` parts dropped."""
    out: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            parts = [p.strip() for p in tok.string.split("#") if p.strip()]
            parts = [p for p in parts if not p.startswith("type:")]
            if parts:
                out[tok.start[0]] = " ".join(parts)
    return out


def _flatten(value, prefix: str = "") -> dict:
    out = {}
    if isinstance(value, dict):
        for k, v in value.items():
            key = f"{prefix}{k}"
            out[key] = v
            out.update(_flatten(v, key + "."))
    return out


class ParamsReference:
    """The rows of the params reference: every key of the schema (every branch of a union by ``kind``
    included), with what params.yaml says of it."""

    def __init__(self, root: Path = ROOT):
        import yaml

        from pipeline.params.schema import Params

        self.schema = Params.model_json_schema()
        self.defs = self.schema.get("$defs", {})
        self.values = yaml.safe_load((root / "params.yaml").read_text())
        self.present = _flatten(self.values)
        self.defaults = _flatten(Params().model_dump(mode="json"))  # default factories included
        self.comments, self.header = yaml_comments(root / "params.yaml")
        self.classes = _schema_classes(Params)
        self.named = {name for name, sub in self.schema["properties"].items()
                      if isinstance(self.resolve(sub).get("additionalProperties"), dict)}
        self.rows: list[dict] = []
        for name, sub in self.schema["properties"].items():
            self.walk(name, sub, [name] if name in self.present else [], None, top=name)

    # ------------------------------------------------------------------ the schema's nodes
    def resolve(self, node: dict) -> dict:
        while "$ref" in node:
            node = self.defs[node["$ref"].rsplit("/", 1)[-1]]
        return node

    def options(self, node: dict) -> tuple[list[dict], bool]:
        """The members of a union (itself when it is none), and whether null is allowed."""
        node = self.resolve(node)
        members = node.get("anyOf") or node.get("oneOf")
        if not members:
            return [node], False
        nullable = any(self.resolve(m).get("type") == "null" for m in members)
        return [self.resolve(m) for m in members if self.resolve(m).get("type") != "null"], nullable

    def generic(self, key: str) -> str:
        """``samplers.ddim.eta`` → ``samplers.<name>.eta`` (the key as the reference lists it)."""
        parts = key.split(".")
        if parts[0] in self.named and len(parts) > 1:
            parts[1] = NAMED
        return ".".join(parts)

    def meaning(self, key: str, instances: list[str], title: str | None, field: str) -> str:
        """The comment params.yaml has for the key (for a generic key, of its first instance that has
        one), else the comment of the field in the source of the schema's class."""
        for instance in instances:
            if self.comments.get(instance):
                return self.comments[instance]
        cls = self.classes.get(title or "")
        if cls is not None and source_comments(cls).get(field):
            return source_comments(cls)[field]
        if field == NAMED:
            return "one named entry (its name: letters, digits and `_`; it names files and metrics)"
        return ""

    # ------------------------------------------------------------------ the walk
    def walk(self, key: str, node: dict, instances: list[str], title: str | None, top: str,
             only: str | None = None, required: bool = False, branch: str | None = None) -> None:
        """The rows of ``key`` (schema ``node``) and of the keys below it. ``instances``: the keys of
        params.yaml it stands for (``samplers.ddim.eta`` for ``samplers.<name>.eta``)."""
        members, nullable = self.options(node)
        resolved = self.resolve(node)
        field = key.rsplit(".", 1)[-1]
        value = next((self.present[i] for i in instances if i in self.present), None)
        default = resolved.get("default", node.get("default"))
        if default is None and not required and key in self.defaults:
            default = self.defaults[key]
        meaning = self.meaning(key, instances, title, field)
        if not meaning and branch:
            meaning = branch
        if NAMED in key:  # one value per entry
            value = {i.split(".")[1]: self.present[i] for i in instances if i in self.present} or None
        row = {"key": key, "members": members, "nullable": nullable, "value": value,
               "present": any(i in self.present for i in instances), "default": default, "required": required,
               "only": only, "meaning": meaning, "top": top, "group": any(_is_object(m) for m in members)}
        self.rows.append(row)
        objects = [m for m in members if _is_object(m)]
        disc = (resolved.get("discriminator") or {}).get("propertyName")
        if disc and len(objects) > 1:  # a tagged union: the tag's row, then each branch's own keys
            tags = [(m["properties"][disc].get("const"), m) for m in objects]
            row["tags"] = [t for t, _ in tags]
            chosen = {t: [i for i in instances if self.present.get(f"{i}.{disc}") == t] for t, _ in tags}
            tag_key = f"{key}.{disc}"
            if len(instances) > 1 or key.endswith(NAMED):  # named entries: each kind's meaning
                tag_meaning = "; ".join(f"`{t}`: {self.comments[f'{chosen[t][0]}.{disc}']}" for t, _ in tags
                                        if chosen[t] and self.comments.get(f"{chosen[t][0]}.{disc}"))
            else:
                tag_meaning = self.meaning(tag_key, [f"{i}.{disc}" for i in instances], None, disc)
            self.rows.append({"key": tag_key, "members": [{"enum": row["tags"]}], "nullable": False,
                              "value": next((self.present[f"{i}.{disc}"] for i in instances
                                             if f"{i}.{disc}" in self.present), None),
                              "present": any(f"{i}.{disc}" in self.present for i in instances),
                              "default": None, "required": True, "only": only, "meaning": tag_meaning, "top": top,
                              "group": False})
            for tag, member in tags:
                self._properties(key, member, chosen[tag], top, f"{disc}: {tag}", skip=disc,
                                 branch=_plain(member.get("description", "")))
            return
        for member in objects:
            if "properties" in member:
                self._properties(key, member, instances, top, only)
            extra = member.get("additionalProperties")
            if isinstance(extra, dict):
                entries = [f"{i}.{name}" for i in instances for name in (self.present.get(i) or {})]
                row["entries"] = [e.rsplit(".", 1)[-1] for e in entries]
                self.walk(f"{key}.{NAMED}", extra, entries, None, top, only)

    def _properties(self, key: str, member: dict, instances: list[str], top: str, only: str | None,
                    skip: str | None = None, branch: str | None = None):
        required = set(member.get("required", []))
        for name, sub in member["properties"].items():
            if name != skip:
                self.walk(f"{key}.{name}", sub, [f"{i}.{name}" for i in instances], member.get("title"), top, only,
                          required=name in required, branch=branch)

    # ------------------------------------------------------------------ rendering
    def markdown(self) -> str:
        out = ["# params.yaml", "",
               "Every key of `params.yaml`, generated from the params schema (`pipeline.params.schema.Params`: type, "
               "bounds and default) and from `params.yaml` itself (its value there, and its meaning: the comment "
               "at the end of the key's line, else the comment of the field in the schema's source). Every stage "
               "validates the keys it reads before any work, and `check` the whole file: an unknown key, a wrong "
               "type (a boolean is never a number), a value out of its bounds, NaN or infinity, or a choice not "
               "listed stops it with one `error:` line naming the key.", "",
               f"The file's own header: *{_escape(self.header)}*", "",
               "*default* is the schema's: what a key left out of the file means. *params.yaml* is the value the "
               "file sets. A key marked *kind: X only* belongs to that choice of its group's `kind`. The sections "
               f"of named entries (`samplers`, `guidance`) list their keys as `section.{NAMED}.key`.", ""]
        tops = [r for r in self.rows if "." not in r["key"]]
        order = list(self.values) + [r["key"] for r in tops if r["key"] not in self.values]
        out += ["## Top level", "", "The diffusion model and its objective.", ""]
        out += self._table([r for r in tops if not r["group"]])
        for name in order:
            row = next((r for r in tops if r["key"] == name), None)
            if row is None or not row["group"]:
                continue
            out += [f"## {name}", ""]
            if row["meaning"]:
                out += [_escape(row["meaning"][:1].upper() + row["meaning"][1:]) + ".", ""]
            if row.get("entries") is not None:
                out += [f"Named entries in params.yaml: {', '.join(f'`{n}`' for n in row['entries']) or 'none'}.", ""]
            out += self._table([r for r in self.rows if r["top"] == name])
        return "\n".join(out) + "\n"

    def _table(self, rows: list[dict]) -> list[str]:
        out = ["| key | type | allowed | default | params.yaml | meaning |", "|---|---|---|---|---|---|"]
        for r in rows:
            meaning = _escape(r["meaning"])
            if r["only"]:
                meaning = f"*{_escape(r['only'])} only.* " + meaning
            out.append(f"| `{r['key']}` | {_type(self, r)} | {_allowed(self, r)} | {_default(r)} | "
                       f"{_value(r)} | {meaning or '—'} |")
        return out + [""]


def _is_object(node: dict) -> bool:
    return node.get("type") == "object" or "properties" in node


def _schema_classes(model) -> dict[str, type]:
    """{schema title: the Python class} of every group and branch reachable from ``model``."""
    import dataclasses
    import types
    import typing

    out: dict[str, type] = {}

    def visit(tp):
        while typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType, list, tuple, dict):
            for arg in typing.get_args(tp):
                visit(arg)
            return
        if not isinstance(tp, type) or tp.__name__ in out:
            return
        if hasattr(tp, "model_fields"):
            out[tp.__name__] = tp
            for f in tp.model_fields.values():
                visit(f.annotation)
        elif dataclasses.is_dataclass(tp):
            out[tp.__name__] = tp
            for f in typing.get_type_hints(tp, include_extras=True).values():
                visit(f)

    visit(model)
    return out


def _escape(text: str) -> str:
    """Text for a Markdown table cell: ``|`` escaped, and ``<``/``>`` outside code spans (they would be HTML)."""
    parts = str(text).replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for i, p in enumerate(parts))


def _literal(value) -> str:
    """A value as params.yaml would spell it, in a code span."""
    def spell(v):
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(spell(x) for x in v) + "]"
        if isinstance(v, float) and len(repr(v)) > 8:
            return f"{v:.6g}"
        return str(v)

    return f"`{spell(value)}`"


def _number(x) -> str:
    if isinstance(x, int) and not isinstance(x, bool) and x == 2**63:
        return "2⁶³"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _type(ref: ParamsReference, row: dict) -> str:
    if "tags" in row:
        return "group, by `kind`"
    names = []
    for m in row["members"]:
        names.append(_type_of(ref, m, row))
    text = " or ".join(dict.fromkeys(names))
    return text + (" or null" if row["nullable"] else "")


def _type_of(ref: ParamsReference, m: dict, row: dict) -> str:
    m = ref.resolve(m)
    if "enum" in m or "const" in m:
        return "choice"
    kind = m.get("type")
    if kind == "array":
        items = m.get("prefixItems")
        if items:
            return f"list of {len(items)} ({', '.join(_type_of(ref, i, {}) for i in items)})"
        return f"list of {_type_of(ref, m.get('items', {}), {})}" if m.get("items") else "list"
    if kind == "object" or "properties" in m:
        return "named entries" if isinstance(m.get("additionalProperties"), dict) else "group"
    return {"integer": "integer", "number": "number", "boolean": "boolean", "string": "text"}.get(kind, str(kind))


def _bounds(m: dict) -> str:
    lo = ("[", m["minimum"]) if "minimum" in m else ("(", m["exclusiveMinimum"]) if "exclusiveMinimum" in m else None
    hi = ("]", m["maximum"]) if "maximum" in m else (")", m["exclusiveMaximum"]) if "exclusiveMaximum" in m else None
    if lo and hi:
        return f"{lo[0]}{_number(lo[1])}, {_number(hi[1])}{hi[0]}"
    if lo:
        return f"{'≥' if lo[0] == '[' else '>'} {_number(lo[1])}"
    if hi:
        return f"{'≤' if hi[0] == ']' else '<'} {_number(hi[1])}"
    return ""


def _allowed(ref: ParamsReference, row: dict) -> str:
    if "tags" in row:
        return "`kind`: " + " · ".join(f"`{t}`" for t in row["tags"])
    parts = []
    for m in row["members"]:
        m = ref.resolve(m)
        if "enum" in m:
            parts.append(" · ".join(f"`{v}`" for v in m["enum"]))
        elif "const" in m:
            parts.append(f"`{m['const']}`")
        elif m.get("type") in ("integer", "number"):
            parts.append(_bounds(m))
        elif m.get("type") == "array":
            items = m.get("prefixItems") or ([m["items"]] if m.get("items") else [])
            inner = [b for b in (_bounds(ref.resolve(i)) for i in items) if b]
            enum = [" · ".join(f"`{v}`" for v in ref.resolve(i)["enum"]) for i in items if "enum" in ref.resolve(i)]
            text = ", ".join(f"items {b}" for b in inner + enum)
            if "minItems" in m and "prefixItems" not in m:
                text = (text + "; " if text else "") + f"at least {m['minItems']} item{'s' * (m['minItems'] != 1)}"
            parts.append(text)
    text = "; ".join(p for p in parts if p)
    return _escape(text).replace("&lt;", "<").replace("&gt;", ">") if text else "—"


def _value(row: dict) -> str:
    value = row["value"]
    if not row["present"] or (isinstance(value, dict) and NAMED not in row["key"]):
        return "—"
    if isinstance(value, dict):  # a generic key of named entries: each entry's value
        return "<br>".join(f"{_escape(entry)}: {_literal(v)}" for entry, v in value.items() if not isinstance(v, dict))
    return _literal(value)


def _default(row: dict) -> str:
    if row["required"]:
        return "required"
    default = row["default"]
    if isinstance(default, dict):
        return "—"
    if default is None:
        return "`null`" if row["nullable"] else "—"
    return _literal(default)


def params_markdown(root: Path = ROOT) -> str:
    return ParamsReference(root).markdown()


# ============================================================================= the command line
def _commands():
    """[(name, click command)] of ``python -m pipeline``, each command's module imported."""
    import typer

    from pipeline.cli import COMMANDS

    out = []
    for name, (module, attribute) in COMMANDS.items():
        command = typer.main.get_command(getattr(importlib.import_module(module), attribute))
        command.name = name
        out.append((name, command))
    return out


def command_paths() -> list[str]:
    """Every command and subcommand as typed: ``python -m pipeline study run``, ..."""
    paths = []

    def visit(prefix: str, command):
        paths.append(prefix)
        for sub_name, sub in _subcommands(command):
            visit(f"{prefix} {sub_name}", sub)

    for name, command in _commands():
        visit(f"python -m pipeline {name}", command)
    return paths


def _subcommands(command) -> list:
    """A group's (name, command) pairs; none for a command (Typer vendors click: no isinstance)."""
    return list((getattr(command, "commands", None) or {}).items())


def _param_rows(command) -> list[str]:
    rows = []
    for p in command.params:
        if getattr(p, "hidden", False):
            continue
        if p.param_type_name == "argument":
            name = f"`{p.name.upper()}` (argument)"
        else:
            name = " / ".join(f"`{n}`" for n in p.opts + p.secondary_opts)
        desc = p.type_descriptor
        if desc.is_choice:
            what = " · ".join(f"`{getattr(c, 'value', c)}`" for c in desc.choices)
        elif getattr(p, "is_flag", False):
            what = "flag"
        else:
            what = {"Path": "path", "str": "text", "int": "integer", "float": "number"}.get(p.bare_type(), p.bare_type())
            lo, hi = getattr(p, "min", None), getattr(p, "max", None)
            if lo is not None or hi is not None:
                what += " (" + ", ".join(x for x in (lo is not None and f"≥ {lo}", hi is not None and f"≤ {hi}") if x) + ")"
        if p.multiple or p.nargs == -1:
            what += ", repeatable"
        default = p.default
        if p.required:
            shown = "required"
        elif callable(default) or default is None or default == [] or (getattr(p, "is_flag", False) and default is False):
            shown = "—"
        else:
            shown = _literal(getattr(default, "value", default))
        text = getattr(p, "help", None) or ""
        if p.envvar:
            text += f" (environment: `{p.envvar}`)"
        rows.append(f"| {name} | {what} | {shown} | {_escape(text) or '—'} |")
    return rows


def _help(command) -> str:
    text = (command.help or "").strip()
    text = re.sub(r"(?<!\n)\n(?!\n)", " ", text)  # click keeps the docstring's line breaks
    return _escape(text)


def cli_markdown() -> str:
    import typer

    from pipeline.cli import STAGES, app

    umbrella = typer.main.get_command(app)
    out = ["# Command line", "",
           "Every command of `python -m pipeline` (also the console script `ddpm-pipeline`) with its options, "
           "generated from the Typer commands; `--help` prints the same. The umbrella imports a command's module "
           "only when that command runs (`pipeline.cli.COMMANDS` names the module of each). Each DVC stage is "
           "also a program of its own: `dvc.yaml` runs it as `python -m pipeline.stages.<stage>`, with the same "
           "options.", "",
           "## Options of the umbrella", "",
           "Given before the command: `python -m pipeline --debug train`.", "",
           "| option | type | default | what |", "|---|---|---|---|", *_param_rows(umbrella), ""]

    def section(path: str, command, level: int, stage_module: str | None):
        arguments = " ".join(p.name.upper() for p in command.params if p.param_type_name == "argument")
        usage = " ".join(x for x in (path, arguments, "[OPTIONS]" if command.params else "",
                                      "COMMAND" if _subcommands(command) else "") if x)
        lines = [f"{'#' * level} {path.removeprefix('python -m pipeline ')}", "", f"    {usage}", "",
                 _help(command), ""]
        if stage_module:
            lines += [f"A DVC stage: `dvc.yaml` runs it as `python -m {stage_module}`.", ""]
        if (command.context_settings or {}).get("ignore_unknown_options"):
            lines += ["It hands the arguments it does not know on (`python -m pipeline " + path.split()[-1]
                      + " -S schedule=cosine --queue`).", ""]
        rows = _param_rows(command)
        if rows:
            lines += ["| option | type | default | what |", "|---|---|---|---|", *rows, ""]
        for sub_name, sub in _subcommands(command):
            lines += section(f"{path} {sub_name}", sub, level + 1, None)
        return lines

    commands = _commands()
    out += ["## The stages", "", "In the order of the pipeline.", ""]
    for name, command in commands:
        if name in STAGES:
            out += section(f"python -m pipeline {name}", command, 3, STAGES[name][0])
    out += ["## The other commands", "", "None of these is a DVC stage: no stage depends on their code.", ""]
    for name, command in commands:
        if name not in STAGES:
            out += section(f"python -m pipeline {name}", command, 3, None)
    return "\n".join(out) + "\n"


# ============================================================================= edit cost, modules
def edit_cost_markdown(root: Path = ROOT) -> str:
    from pipeline.experiments import deps

    costs, total = deps.blast_radius(root)
    return "\n".join([
        "# Edit cost", "",
        "What an edit of each code file re-runs, generated from `dvc.yaml` and `params.yaml` by "
        "`pipeline.experiments.deps` (the same table as `python -m pipeline deps`). Each stage of `dvc.yaml` "
        "depends on exactly the files its module imports, so an edit of a file re-runs the stage runs whose "
        "dependencies include it (the matrix stages counted per cell, `sample@ddim-10` …, and the stages that "
        "run every time, `check` and `log`, included).", "",
        "The line-weighted share below is the share of the pipeline's stage runs that a random line's edit "
        "re-runs. The target is at most 0.25 (`tests/test_edit_cost.py` fails above it); it was 0.489 before "
        "the restructure of 2026-12-07 (one module per stage) and 0.217 right after it.", "",
        deps.table(costs, total)])


def edit_cost_summary(root: Path = ROOT) -> str:
    from pipeline.experiments import deps

    costs, total = deps.blast_radius(root)
    weighted, mean = deps.shares(costs, total)
    return (f"Now, an edit of a random line re-runs **{weighted:.3f}** of the {total} stage runs of the default "
            f"pipeline (line-weighted; the mean over the {len(costs)} code files is {mean:.3f}).")


def modules(root: Path, package: str) -> list[tuple[str, Path, str]]:
    """(module name, file, the first paragraph of its docstring) of every module of ``package``."""
    out = []
    for path in sorted((root / package).rglob("*.py")):
        if "__pycache__" in path.parts or path.name == "__main__.py":
            continue
        rel = path.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if rel.name == "__init__" and not doc:
            continue
        out.append((".".join(parts), path, doc.split("\n\n")[0].replace("\n", " ")))
    return out


def api_page(module: str) -> str:
    """A module's API page: mkdocstrings renders its docstrings. Search ranks the guides first."""
    return f"---\nsearch:\n  boost: 0.5\n---\n\n::: {module}\n"


def api_uri(module: str) -> str:
    return "reference/api/" + module.replace(".", "/") + ".md"


def modules_table(root: Path, package: str, base: str = "") -> str:
    """The modules of ``package``: file, what it is, a link to its API page (relative to ``base``)."""
    lines = ["| module | what it is |", "|---|---|"]
    for name, path, first in modules(root, package):
        link = _relative(api_uri(name), base)
        lines.append(f"| [`{path.relative_to(root).as_posix()}`]({link}) | {_escape(_plain(first)) or '—'} |")
    return "\n".join(lines) + "\n"


def _plain(text: str) -> str:
    """A docstring's first paragraph as Markdown: ``x`` → `x`."""
    return text.replace("``", "`")


def _relative(target: str, base: str) -> str:
    import posixpath

    return posixpath.relpath(target, posixpath.dirname(base) or ".")


def readme_page(root: Path = ROOT) -> str:
    """README.md for the site's home page: links into docs/ made the site's, CHANGELOG.md its page."""
    text = (root / "README.md").read_text()
    text = re.sub(r"\]\(docs/", "](", text)
    return text.replace("](CHANGELOG.md)", "](changelog.md)")


# ============================================================================= docstrings as Markdown
SECTION_TITLES = {"Args:", "Arguments:", "Parameters:", "Returns:", "Raises:", "Yields:", "Examples:", "Example:",
                  "Attributes:", "Note:", "Notes:", "Warning:", "Warnings:", "Other Parameters:", "Receives:"}


def markdown_docstring(text: str) -> str:
    """A docstring written as plain text, made to read the same in Markdown: a blank line before a list
    that follows a paragraph line, and before an indented block that follows a line ending in ``:``
    (a table of symbols, a signature: preformatted), which Markdown would otherwise run into the
    paragraph."""
    out: list[str] = []
    for line in text.split("\n"):
        prev = out[-1] if out else ""
        stripped, before = line.lstrip(), prev.lstrip()
        indent, prev_indent = len(line) - len(stripped), len(prev) - len(before)
        item, prev_item = stripped.startswith(("- ", "* ")), before.startswith(("- ", "* "))
        if before and item and not prev_item and prev_indent <= indent:
            out.append("")
        elif (before and stripped and before.endswith(":") and before not in SECTION_TITLES and not prev_item
              and indent >= prev_indent + 4):
            out.append("")
        out.append(line)
    return "\n".join(out)


def _griffe_extension():
    import griffe

    class MarkdownDocstrings(griffe.Extension):
        """mkdocstrings reads docstrings as Markdown; ours are plain text (``markdown_docstring``)."""

        def on_object(self, *, obj, **kwargs):
            if obj.docstring is not None:
                obj.docstring.value = markdown_docstring(obj.docstring.value)

    return MarkdownDocstrings


try:  # the griffe extension mkdocs.yml names (scripts/docs_site.py:MarkdownDocstrings)
    MarkdownDocstrings = _griffe_extension()
except ImportError:  # griffe is not installed: no docs build here
    pass


# ============================================================================= MkDocs hooks
def on_config(config, **kwargs):
    """The API pages into the nav's Reference section (every module, so that none is left out)."""
    nav = config.get("nav") or []
    for entry in nav:
        if isinstance(entry, dict) and "Reference" in entry:
            section = entry["Reference"]
            for package, title in API_PACKAGES.items():
                pages = [{"Modules": f"reference/api/{package}/index.md"}]
                pages += [{name: api_uri(name)} for name, _, _ in modules(ROOT, package)]
                section.append({title: pages})
    return config


def on_files(files, config, **kwargs):
    from mkdocs.structure.files import File

    generated = {"index.md": readme_page(), "changelog.md": (ROOT / "CHANGELOG.md").read_text(),
                 "reference/params.md": params_markdown(), "reference/cli.md": cli_markdown(),
                 "reference/edit-cost.md": edit_cost_markdown()}
    for package, title in API_PACKAGES.items():
        index = f"reference/api/{package}/index.md"
        generated[index] = (f"# {title}\n\nEvery module of `{package}/`, from its docstrings.\n\n"
                            + modules_table(ROOT, package, index))
        for name, _, _ in modules(ROOT, package):
            generated[api_uri(name)] = api_page(name)
    for uri, content in generated.items():
        if files.get_file_from_path(uri) is not None:
            files.remove(files.get_file_from_path(uri))
        files.append(File.generated(config, uri, content=content))
    for uri, source in {**FIGURES, **ASSETS}.items():
        files.append(File.generated(config, uri, abs_src_path=str(ROOT / source)))
    return files


MARKER = re.compile(r"<!-- generated: (modules (\w+)|edit-cost summary) -->")


def on_page_markdown(markdown, page, config, files, **kwargs):
    def replace(match):
        if match.group(2):
            return modules_table(ROOT, match.group(2), page.file.src_uri)
        return edit_cost_summary()

    return MARKER.sub(replace, markdown)


if __name__ == "__main__":
    pages = {"params": params_markdown, "cli": cli_markdown, "edit-cost": edit_cost_markdown}
    if len(sys.argv) != 2 or sys.argv[1] not in pages:
        sys.exit(f"usage: python scripts/docs_site.py {'|'.join(pages)}")
    print(pages[sys.argv[1]](), end="")
