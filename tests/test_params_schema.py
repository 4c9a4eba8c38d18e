"""Every field of the params schema, tried with values it must refuse: out of its bounds,
of the wrong type, missing (null, or absent where the key is required), plus an unknown key
in every group. The bad values are derived from the schema (``Params.model_json_schema()``),
so a field added later is tried too, and a number without an explicit lower bound fails
the test. Each bad input must stop the `check` stage and every stage that reads the key
with one ``error:`` line naming the key, before any work: no file of the workspace changes.
The bad inputs are tried in chunks, one test per group of params (``train.*``, ``model.*``, ...):
a failure names its group, and the rest of the groups still run."""

import copy
import hashlib
import math
import shlex
from pathlib import Path

import pytest
import yaml
from helpers import REPO
from tiny import cli, errors, workspace

from helpers import stage_keys
from pipeline.params.schema import Params

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = Params.model_json_schema()
SENTINEL = b"produced by an earlier run"


def resolve(node: dict) -> dict:
    while "$ref" in node:
        node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def branch(node: dict, value) -> tuple[dict, bool]:
    """The schema ``value`` is validated against (the matching branch of a union), and
    whether null is allowed."""
    node = resolve(node)
    options = node.get("anyOf") or node.get("oneOf")
    if not options:
        return node, False
    nullable = any(resolve(o).get("type") == "null" for o in options)
    options = [resolve(o) for o in options if resolve(o).get("type") != "null"]
    if "discriminator" in node and isinstance(value, dict):
        tag = node["discriminator"]["propertyName"]
        options = [o for o in options if o["properties"][tag].get("const") == value.get(tag)]
    return options[0], nullable


def bad_values(path: str, node: dict, value, nullable: bool) -> list[tuple[str, object]]:
    """(what is wrong, the value) for the field at ``path``, from its schema ``node``."""
    out = [] if nullable else [("missing (null)", None)]
    if "enum" in node or "const" in node:
        return out + [("not a choice", "no-such-choice"), ("wrong type", [value])]
    kind = node.get("type")
    if kind in ("integer", "number"):
        assert "minimum" in node or "exclusiveMinimum" in node, \
            f"{path} is a number without a lower bound: give it explicit bounds (ge/gt, le/lt)"
        for bound, offset in (("minimum", -1), ("exclusiveMinimum", 0), ("maximum", 1), ("exclusiveMaximum", 0)):
            if bound in node:
                out.append((f"{bound} {node[bound]} {'+' if offset >= 0 else ''}{offset}", node[bound] + offset))
        if kind == "integer":
            out.append(("fractional", node.get("minimum", node.get("exclusiveMinimum", 0)) + 1.5))
        else:
            out += [("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)]
        return out + [("text", "many"), ("list", [1]), ("mapping", {"a": 1})]
    if kind == "boolean":
        return out + [("text", "maybe"), ("number", 2), ("list", [True])]
    if kind == "string":
        return out + [("list", ["x"]), ("mapping", {"a": "x"})]
    if kind == "array":
        out += [("text", "many"), ("mapping", {"a": 1})]
        if node.get("minItems"):
            out.append(("too few items", [0] * (node["minItems"] - 1) if value is None
                        else list(value)[:node["minItems"] - 1]))
        if value is None:  # a null default (e.g. guidance.<name>.interval): no items to spoil
            return out
        first = value[0] if value else None
        item, item_nullable = branch((node.get("prefixItems") or [node.get("items")])[0], first)
        out += [(f"item 0: {what}", [bad, *value[1:]])
                for what, bad in bad_values(f"{path}.0", item, first, item_nullable)]
        return out
    if kind == "object":
        return out + [("wrong type", 5), ("list", [1]), ("unknown key", {**value, "no_such_key": 1})]
    raise AssertionError(f"{path}: no bad values for schema {node}")


def fields(node: dict, value, path: str = ""):
    """(dotted key, schema, current value, nullable, required) of every field below ``node``,
    walking groups, named entries (``samplers.<name>``) and the chosen branch of unions."""
    node, _ = branch(node, value)
    required = set(node.get("required", []))
    for name, sub in (node.get("properties") or {}).items():
        key = f"{path}{name}"
        current = value.get(name, resolve(sub).get("default"))
        schema, nullable = branch(sub, current)
        yield key, schema, current, nullable, name in required
        if isinstance(current, dict):
            yield from fields(sub, current, f"{key}.")
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        for name, current in value.items():
            key = f"{path}{name}"
            schema, nullable = branch(extra, current)
            yield key, schema, current, nullable, False
            yield from fields(extra, current, f"{key}.")


def with_value(raw: dict, key: str, new, delete: bool = False) -> dict:
    out = copy.deepcopy(raw)
    *parents, last = key.split(".")
    target = out
    for part in parents:
        target = target[part]
    if delete:
        del target[last]
    else:
        target[last] = new
    return out


TOP = "(top level)"
# the groups of params: the top-level fields that hold fields of their own (train, model, samplers, ...)
GROUPS = sorted(name for name, sub in SCHEMA["properties"].items()
                if any(o.get("type") == "object" or "properties" in o
                       for o in [resolve(sub), *map(resolve, resolve(sub).get("anyOf", []))]))


def group_of(key: str) -> str:
    """The chunk a key's bad inputs are tried in: its group, or the top level."""
    first = key.split(".")[0]
    return first if first in GROUPS else TOP


def bad_inputs(raw: dict, group: str | None = None):
    """(key, what is wrong, the whole params with that one fault), of ``group`` only when given."""
    if group in (None, TOP):
        yield TOP, "unknown key", {**raw, "no_such_key": 1}
    for key, schema, current, nullable, required in fields(SCHEMA, raw):
        if group is not None and group_of(key) != group:
            continue
        if required:
            yield key, "absent", with_value(raw, key, None, delete=True)
        for what, bad in bad_values(key, schema, current, nullable):
            yield key, what, with_value(raw, key, bad)


def stage_commands(raw: dict) -> dict[str, tuple[list[str], list[str]]]:
    """Per stage of dvc.yaml: (its command's arguments, its outputs), matrix items filled in
    with the first sampler and step count."""
    item = {"sampler": raw["sample"]["samplers"][0], "steps": str(raw["sample"]["steps"][0])}
    fill = lambda text: text.replace("${item.sampler}", item["sampler"]).replace("${item.steps}", item["steps"])  # noqa: E731
    out = {}
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        args = shlex.split(fill(stage["cmd"]))
        assert args[:2] == ["python", "-m"] and args[2].startswith("pipeline.stages."), stage["cmd"]
        command = args[2].removeprefix("pipeline.stages.").replace("_", "-")  # python -m pipeline <command>
        outs = [fill(next(iter(e)) if isinstance(e, dict) else e)
                for kind in ("outs", "metrics", "plots") for e in stage.get(kind) or []]
        out[name] = ([command, *args[3:]], outs)
    return out


def readers(key: str) -> list[str]:
    """The stages that declare ``key`` (or a group holding it) in STAGE_PARAMS."""
    def declares(declared: str) -> bool:
        declared = declared.replace("${item.sampler}", key.split(".")[1] if key.startswith("samplers.") else "")
        return key == declared or key.startswith(declared + ".") or declared.startswith(key + ".")
    return [stage for stage, keys in stage_keys().items() if any(declares(k) for k in keys)]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "params.yaml"}


def test_bad_values_cover_every_group_and_key(tmp_path, figure):
    """What the chunks below try, together: every key of the schema, each in exactly one chunk."""
    raw = yaml.safe_load(workspace(tmp_path).joinpath("params.yaml").read_text())
    every = [(key, what) for key, what, _ in bad_inputs(raw)]
    chunks = [(key, what) for group in [TOP, *GROUPS] for key, what, _ in bad_inputs(raw, group)]
    assert sorted(chunks) == sorted(every)
    keys = {key for key, _ in every}
    assert {"train", "model", "sample", "samplers", "data"} <= set(GROUPS)
    assert len(every) > 200 and {"train.steps", "train.lr", "model.ch_mult", "samplers.ddim.eta"} <= keys
    figure(f"params schema: {len(every)} bad inputs tried over {len(keys)} keys (in {len(GROUPS) + 1} chunks), "
           "each one `error:` line naming the key, before any work, nothing touched")


@pytest.mark.parametrize("group", [TOP, *GROUPS])
def test_every_bad_value_of_every_param_fails_before_any_work(tmp_path, idx_dir, group):
    root = workspace(tmp_path)
    (root / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["data"]["root"] = str(idx_dir)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    commands = stage_commands(raw)
    for _, outs in commands.values():  # what earlier runs produced, everywhere a stage writes
        for out in outs:
            target = root / out / "sentinel" if not Path(out).suffix else root / out
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(SENTINEL)
    good = cli(root, *commands["check"][0])
    assert good.exit_code == 0, good.output  # the good params pass
    before = snapshot(root)

    tried = 0
    for key, what, params in bad_inputs(raw, group):
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        for stage in ["check", *readers(key)]:
            result = cli(root, *commands[stage][0])
            lines = errors(result)
            context = f"{key} {what} ({stage}): {result.output}"
            assert result.exit_code == 1 and len(lines) == 1, context
            assert result.stderr.strip() == lines[0], context  # nothing else: no traceback, no progress
            assert key.removeprefix("(top level)") in lines[0] or "no_such_key" in lines[0], context
        assert snapshot(root) == before, f"{key} {what}: a file of the workspace changed"
        tried += 1
    assert tried > 0, group


def test_a_number_without_bounds_is_caught(monkeypatch):
    """The test above refuses a schema whose numbers lack bounds (as a field added without them)."""
    import copy

    schema = copy.deepcopy(SCHEMA)
    schema["$defs"]["TrainParams"]["properties"]["new_rate"] = {"type": "number", "default": 0.5}
    monkeypatch.setitem(globals(), "SCHEMA", schema)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    with pytest.raises(AssertionError, match="train.new_rate is a number without a lower bound"):
        list(bad_inputs(raw))
