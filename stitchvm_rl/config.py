"""Typed configs: dataclasses loaded from YAML plus `key.sub=value` overrides on the command line.

Every field carries a one-line docstring (the string literal right under it); `field_docs` reads
them back from the source, so `--help` and error messages can quote them. Ranges and choices live
in the type: `Annotated[int, Range(1)]`, `Literal["a", "b"]`.

    cfg = load_config(SampleConfig, sys.argv[1:])   # [--config FILE] [key.sub=value ...]

Bad input stops with one `ConfigError` naming the key, what was given and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import keyword
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the key and what is allowed."""


@dataclass(frozen=True)
class Range:
    """Inclusive bounds for a numeric field: `Annotated[float, Range(0, 1)]`."""

    lo: float | None = None
    hi: float | None = None

    def check(self, key: str, value: float) -> None:
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            lo = "-inf" if self.lo is None else self.lo
            hi = "inf" if self.hi is None else self.hi
            raise ConfigError(f"config key '{key}' = {value!r} is out of range; allowed: [{lo}, {hi}]")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each field of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def _describe(tp: Any) -> str:
    """A short human description of a field type, for error messages."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *extras = get_args(tp)
        rng = next((e for e in extras if isinstance(e, Range)), None)
        suffix = f" in [{'-inf' if rng.lo is None else rng.lo}, {'inf' if rng.hi is None else rng.hi}]" if rng else ""
        return _describe(base) + suffix
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_describe(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of str to {_describe(get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return getattr(tp, "__name__", str(tp))


def did_you_mean(value: Any, allowed) -> str:
    """'; did you mean 'x'?' for the allowed name closest to a mistyped one, else ''."""
    allowed = [str(a) for a in allowed]
    longer = [a for a in allowed if a.startswith(str(value))]  # a cut-short name, e.g. ViT-H-14-378 for ...-quickgelu
    close = longer if len(longer) == 1 else difflib.get_close_matches(str(value), allowed, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_names(key: str, values, allowed, what: str = "name") -> None:
    """A job's check of names a plain str / list / dict config field holds (reward names, estimators,
    ...), before Ray starts or a model loads: the first unknown one stops with one ConfigError."""
    allowed = [str(a) for a in allowed]
    for value in values:  # a dict gives its keys: the names of {name: weight}
        if value not in allowed:
            raise ConfigError(f"{key}: unknown {what} {value!r}; choose from {', '.join(allowed)}{did_you_mean(value, allowed)}")


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the field type `tp` and return it converted (e.g. int -> float)."""
    origin = get_origin(tp)
    bad = ConfigError(f"config key '{key}' = {value!r} has the wrong type; expected {_describe(tp)}")
    if origin is Annotated:
        base, *extras = get_args(tp)
        out = _convert(base, value, key)
        for extra in extras:
            if isinstance(extra, Range):
                extra.check(key, out)
        return out
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"config key '{key}' = {value!r} is not allowed; expected {_describe(tp)}{did_you_mean(value, get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _convert(arg, value, key)
            except ConfigError:
                continue
        raise bad
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise bad
        return str(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        items = [_convert(get_args(tp)[0], v, f"{key}[{n}]") for n, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {str(k): _convert(get_args(tp)[1], v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return from_dict(tp, value, prefix=key + ".")
    raise TypeError(f"unsupported config field type {tp!r} at '{key}'")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build the dataclass `cls` from a (nested) mapping, checking every key, type and range."""
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        key = _field_name(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
            where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
            raise ConfigError(
                f"unknown config key '{prefix}{key}'; {hint}allowed {where}: {', '.join(names)}"
            )
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            value = merge_sections(hints[key], section_default(cls, key), value)
        kwargs[key] = _convert(hints[key], value, prefix + key)
    return cls(**kwargs)


def section_default(cls: type, name: str) -> dict:
    """The default of section `name` as `cls` declares it (a job's own defaults, e.g. the toy lr of
    its train section), as data: the keys a config gives for the section are laid over it."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return to_dict(f.default_factory())
    return {} if f.default is dataclasses.MISSING else to_dict(f.default)


def _field_name(key: Any) -> Any:
    """A key that is a Python keyword names the field with a trailing underscore (`async` -> `async_`)."""
    return f"{key}_" if isinstance(key, str) and keyword.iskeyword(key) else key


def _key_name(name: str) -> str:
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def to_dict(cfg: Any) -> dict:
    """The config as plain YAML-safe data (tuples become lists; `async_` is written as `async`)."""

    def keys(node):
        if isinstance(node, dict):
            return {_key_name(k): keys(v) for k, v in node.items()}
        return node

    return keys(yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (every run keeps one beside its outputs)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


@dataclass(frozen=True)
class FieldDoc:
    """One key of a config, as `--help` and docs/configuration.md show it."""

    key: str  # dotted, as typed on the command line (`rollout.async`)
    default: Any  # None for a section
    kind: str  # the type in words, or "section"
    doc: str


def walk_fields(cls: type, prefix: str = "") -> list[FieldDoc]:
    """Every key of `cls` in declaration order, each section followed by its own keys."""
    hints = typing.get_type_hints(cls, include_extras=True)
    docs, default, rows = field_docs(cls), cls(), []
    for f in dataclasses.fields(cls):
        key = prefix + _key_name(f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            rows.append(FieldDoc(key, None, "section", docs.get(f.name, "")))
            rows += [dataclasses.replace(r, default=_at(getattr(default, f.name), r.key[len(key) + 1 :])) if r.kind != "section" else r for r in walk_fields(hints[f.name], key + ".")]
        else:
            rows.append(FieldDoc(key, getattr(default, f.name), _describe(hints[f.name]), docs.get(f.name, "")))
    return rows


def _at(section: Any, dotted: str) -> Any:
    """The value at `dotted` (`rollout.async`) inside a section instance."""
    for part in dotted.split("."):
        section = getattr(section, _field_name(part))
    return section


def format_help(cls: type) -> str:
    """One line per key: name, default and docstring; a section's keys follow it."""
    return "\n".join(f"{r.key}:  # {r.doc}" if r.kind == "section" else f"{r.key}={r.default!r}  # {r.doc}" for r in walk_fields(cls))


def format_markdown(cls: type) -> str:
    """A markdown table of every key: key, default, type, docstring (docs/configuration.md)."""

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| key | default | type | what it does |", "|---|---|---|---|"]
    for r in walk_fields(cls):
        if r.kind == "section":
            lines.append(f"| **`{r.key}`** | | section | {cell(r.doc)} |")
        else:
            lines.append(f"| `{r.key}` | `{cell(yaml.safe_dump(r.default, default_flow_style=True, width=10**6).strip().removesuffix('...').strip())}` | {cell(r.kind)} | {cell(r.doc)} |")
    return "\n".join(lines)


def merge_sections(cls: type, base: dict, overlay: dict) -> dict:
    """`overlay` over `base`: a section (a dataclass field) is merged key by key, any other value,
    a mapping such as `rollout_resources` included, is replaced whole."""
    hints = typing.get_type_hints(cls, include_extras=True)
    merged = dict(base)
    for key, value in overlay.items():
        tp = hints.get(_field_name(key))
        if dataclasses.is_dataclass(tp) and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_sections(tp, merged[key], value)
        else:
            merged[key] = value
    return merged


def _set_path(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def load_config(cls: type, argv: list[str]) -> Any:
    """Parse `[--config FILE ...] [key.sub=value ...]` into `cls`; values are read as YAML scalars.
    A later --config file lays its keys over the earlier ones section by section (a layout file
    such as jobs/configs/nft_layout_one_node_8x80gb.yaml over a run's config); key=value goes last."""
    data: dict = {}
    overrides = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(format_help(cls))
            raise SystemExit(0)
        if arg == "--config" or arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1] if "=" in arg else (args.pop(0) if args else ""))
            if not path.is_file():
                raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML file to --config")
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as err:
                raise ConfigError(f"config file '{path}' is not valid UTF-8 YAML: {err}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(loaded).__name__}")
            data = merge_sections(cls, data, loaded)
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(f"argument '{arg}' is not understood; use --config FILE or key.sub=value")
    for arg in overrides:
        key, raw = arg.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_path(data, key.strip(), value)
    return from_dict(cls, data)


def run_main(main) -> None:
    """Entry point of every job script: `main(sys.argv[1:])`; a bad input (any ValueError or a
    missing file: config, model source, prompt file...) ends with its one-line message, exit 2."""
    import sys

    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
