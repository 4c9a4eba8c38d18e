"""Reading params.yaml: validation with one line per bad key, and per-stage views.

Each section of params.yaml has its own schema module (``pipeline.params.<section>``) holding
``FIELDS`` (name → (type, default) of the section's top-level keys, as pydantic's
``create_model`` takes them) and optionally ``VALIDATORS`` (checks across those keys). A stage
validates the sections it reads (``load``), so that the schema of another section, and the
library code that section's choices come from, are no dependency of it; the `check` stage and
the commands that queue experiments validate the whole file (``pipeline.params.schema``).

Validation refuses, before any work: an unknown key (within a section a stage reads; the
whole file's top level in `check`), a wrong type (a boolean where a number belongs included),
a value out of its bounds (every number has explicit bounds and must be finite) or an invalid
choice, each as ``ParamsError`` naming the dotted key (one line per bad key) and, for choices,
the allowed values; so does an empty file (it would silently mean every default).

``load`` returns a ``View``: the params limited to the keys the stage declares in dvc.yaml (its
module's ``KEYS``, checked against dvc.yaml by the tests), so that reading an undeclared key fails
loudly instead of letting the stage go stale.
"""

import dataclasses
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from ddpm.errors import InputError
from pipeline import yamlio


class ParamsError(InputError):
    pass


STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)  # also applies to the nested dataclasses


class Strict(BaseModel):
    model_config = STRICT


Seed = Annotated[int, Field(ge=0, lt=2**63)]


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}, "c": 2}`` → ``{"a.b": 1, "c": 2}``, each key under ``prefix``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------------- schemas of sections
def schema(name: str, *sections, validators: tuple = ()) -> type[BaseModel]:
    """The model of the ``sections`` (schema modules, each with ``FIELDS`` and maybe ``VALIDATORS``),
    strict: an unknown key is refused (``validate`` hands a stage's model only its own sections)."""
    fields, checks = {}, list(validators)
    for section in sections:
        fields.update(section.FIELDS)
        checks += list(getattr(section, "VALIDATORS", ()))

    def check(self):
        for fn in checks:
            try:
                fn(self)
            except ValueError as e:
                raise ValueError(str(e)) from None
        return self

    return create_model(name, __config__=STRICT, __validators__={"check": model_validator(mode="after")(check)},
                        **fields)


def _key(loc: tuple, raw: Any) -> str:
    """The dotted key of an error's location in the input ``raw``: without pydantic's
    validator steps and without the tag of a discriminated union (``samplers.ddim.eta``,
    not ``samplers.ddim.ddim.eta``)."""
    parts, node = [], raw
    for p in loc:
        if str(p).startswith(("function-", "tagged-union")):
            continue
        if isinstance(node, dict) and p not in node and node.get("kind") == p:
            continue  # the tag: the union's branch chosen by `kind`
        parts.append(str(p))
        node = node[p] if isinstance(node, dict) and p in node else (
            node[p] if isinstance(node, list) and isinstance(p, int) and p < len(node) else None)
    return ".".join(parts)


def _problems(e: ValidationError, raw: Any) -> dict[str, list[str]]:
    """What is wrong, per dotted key (a key can collect several messages, e.g. from a union)."""
    out: dict[str, list[str]] = {}
    for err in e.errors():
        key = _key(err["loc"], raw)
        msg = err["msg"]
        if err["type"] in ("union_tag_not_found", "union_tag_invalid"):  # name the tag's key
            key = f"{key}.{str(err['ctx']['discriminator']).strip(chr(39))}"
        if err["type"] == "union_tag_not_found":
            msg = "missing (this key is required)"
        elif err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            msg = "unknown key"
        elif err["type"] in ("missing", "missing_argument"):
            msg = "missing (this key is required)"
        elif key and not isinstance(err.get("input"), (dict, list)) and len(repr(err.get("input"))) <= 40:
            msg = f"{msg} (got {err['input']!r})"
        out.setdefault(key or "(top level)", [])
        if msg not in out[key or "(top level)"]:
            out[key or "(top level)"].append(msg)
    return out


def _unwrap(tp: Any) -> tuple[list, str | None]:
    """The members of an annotation (those of a union, else itself), without ``Annotated``, and the
    discriminator of a tagged union (``Field(discriminator=...)``) when it has one."""
    discriminator = None
    while typing.get_origin(tp) is Annotated:
        tp, *meta = typing.get_args(tp)
        discriminator = next((m.discriminator for m in meta if isinstance(getattr(m, "discriminator", None), str)),
                             discriminator)
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [_unwrap(m)[0][0] for m in typing.get_args(tp)], discriminator
    return [tp], discriminator


def _fields(tp: Any) -> dict[str, tuple[Any, str | None]] | None:
    """name → (annotation, discriminator) of a params group (a model or a dataclass); None for other types."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return {n: (f.annotation, f.discriminator) for n, f in tp.model_fields.items()}
    if hasattr(tp, "__pydantic_fields__"):  # a pydantic dataclass
        return {n: (f.annotation, f.discriminator) for n, f in tp.__pydantic_fields__.items()}
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        return {f.name: (hints[f.name], None) for f in dataclasses.fields(tp)}
    return None


def _is_number(tp: Any) -> bool:
    if typing.get_origin(tp) is Literal:
        return any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in typing.get_args(tp))
    return tp in (int, float)


def _takes_bool(tp: Any) -> bool:
    return tp in (bool, Any) or (typing.get_origin(tp) is Literal and any(isinstance(v, bool) for v in typing.get_args(tp)))


def booleans_for_numbers(raw: Any, tp: Any, key: str = "", discriminator: str | None = None) -> list[str]:
    """The dotted keys where ``raw`` holds a boolean and the schema ``tp`` a number: pydantic would
    read ``true`` as 1 there (an int, a float, ``Literal[1, 3]``), and a boolean is not a number.
    Walks the input along the schema's groups, named entries, tagged unions and lists."""
    members, tag = _unwrap(tp)
    tag = discriminator or tag
    if isinstance(raw, bool):
        return [key] if any(map(_is_number, members)) and not any(map(_takes_bool, members)) else []
    join = (lambda k: f"{key}.{k}") if key else str
    for m in members:
        if isinstance(raw, dict) and (fields := _fields(m)) is not None:
            if tag and tag in fields and raw.get(tag) not in typing.get_args(_unwrap(fields[tag][0])[0][0]):
                continue  # another branch of the tagged union
            return [bad for k, v in raw.items() if k in fields
                    for bad in booleans_for_numbers(v, fields[k][0], join(k), fields[k][1])]
        if isinstance(raw, dict) and typing.get_origin(m) is dict:
            return [bad for k, v in raw.items() for bad in booleans_for_numbers(v, typing.get_args(m)[1], join(k))]
        if isinstance(raw, list) and typing.get_origin(m) in (list, tuple):
            args = typing.get_args(m)
            items = [args[0]] * len(raw) if typing.get_origin(m) is list or args[-1] is Ellipsis else list(args)
            return [bad for i, (v, t) in enumerate(zip(raw, items)) for bad in booleans_for_numbers(v, t, join(i))]
    return []


def _refuse(source: str, problems: list[str]):
    if len(problems) == 1:  # one line
        raise ParamsError(f"invalid params in {source}: {problems[0]}") from None
    raise ParamsError(f"invalid params in {source}:\n" + "\n".join(f"  {p}" for p in problems)) from None


def _at(raw: Any, key: str) -> Any:
    """The value at a dotted key of the input (list items by index)."""
    for part in key.split("."):
        raw = raw[int(part)] if isinstance(raw, list) else raw[part]
    return raw


def validate(raw: Any, model: type[BaseModel], source: str = "params", whole: bool = True):
    """``raw`` (a params file's mapping) validated by ``model``; ``ParamsError`` naming every bad key.
    ``whole=False``: only the top-level keys ``model`` has are read (a stage's sections; another
    stage, and `check`, validate the rest)."""
    if raw is None or raw == {}:  # every default would be the full GPU-sized experiment: never by accident
        raise ParamsError(f"{source} is empty: it holds no params (write them out; params.yaml has them all)")
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of params at the top level")
    if not whole:
        raw = {k: v for k, v in raw.items() if k in model.model_fields}
    booleans = booleans_for_numbers(raw, model)  # before pydantic, which would read them as 1 and 0
    if booleans:
        _refuse(source, [f"{key}: a boolean is not a number (got {_at(raw, key)!r})" for key in booleans])
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        _refuse(source, [f"{key}: {'; '.join(msgs)}" for key, msgs in _problems(e, raw).items()])


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} does not exist")
    try:
        return yamlio.load(path.read_text())
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from None


# ----------------------------------------------------------------------------- stage views
class View:
    """Attribute access to ``obj`` limited to ``allowed`` dotted keys (prefixes allowed)."""

    def __init__(self, obj, allowed: list[str], stage: str, prefix: str = ""):
        self._obj, self._allowed, self._stage, self._prefix = obj, allowed, stage, prefix

    def __getattr__(self, name: str):
        key = f"{self._prefix}{name}"
        if key in self._allowed:
            return getattr(self._obj, name) if not isinstance(self._obj, dict) else self._obj[name]
        if any(a.startswith(key + ".") for a in self._allowed):
            value = getattr(self._obj, name) if not isinstance(self._obj, dict) else self._obj[name]
            return View(value, self._allowed, self._stage, key + ".")
        raise AttributeError(f"stage {self._stage!r} reads param {key!r}, which it does not declare "
                             f"(declared: {', '.join(self._allowed)})")

    def __getitem__(self, name: str):
        return self.__getattr__(name)


def declared(keys: list[str], **item: str) -> list[str]:
    """A stage's declared keys with ``${item.x}`` of a matrix stage filled in from ``item``."""
    out = []
    for key in keys:
        for k, v in item.items():
            key = key.replace(f"${{item.{k}}}", str(v))
        out.append(key)
    return out


def for_stage(params, keys: list[str], stage: str, **item: str) -> View:
    """The params ``stage`` may read: ``keys`` (``${item.x}`` of a matrix stage filled from ``item``)."""
    return View(params, declared(keys, **item), stage)


def values(params, keys: list[str]) -> dict[str, Any]:
    """The values of ``keys`` (no ``${item}``), e.g. ``{"seed": 0, "train": {...}}``, as plain data."""
    dumped = params.model_dump(mode="json")
    out = {}
    for key in keys:
        value = dumped
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out


def load(path: str | Path, stage: str, keys: list[str], *sections, **item: str) -> View:
    """The params of ``stage`` from the file at ``path``: the ``sections`` it reads validated (their
    schema modules), the view limited to its declared ``keys``."""
    model = schema(f"{stage.title().replace('_', '')}Params", *sections)
    params = validate(read_yaml(path), model, str(path), whole=False)
    return for_stage(params, keys, stage, **item)
