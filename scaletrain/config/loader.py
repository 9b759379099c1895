"""Load a JobConfig from defaults < YAML file < `--section.field value` overrides.

Everything is checked here, before any process group or model exists: unknown keys (with
the closest valid key), wrong types, values outside a Literal's choices. Cross-field
checks (parallel degrees vs world size, batch divisibility, the recipe's own rules) live
in `scaletrain.validate`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from scaletrain.config.schema import JobConfig
from scaletrain.registry import get_recipe

_RECIPE_SECTIONS = ("model", "data")


class ConfigError(ValueError):
    """A config problem, reported with the dotted field name."""


class MissingDataError(ConfigError):
    """A data file or folder the config names is not on this machine. Recipes check their data last, so
    `scaletrain config show` can report everything else about a config whose data lives elsewhere."""


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`--a.b 1 --c.d=x` -> {"a.b": "1", "c.d": "x"} (values stay strings until typed)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected an override like --section.field VALUE, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} has no value")
            i += 1
            value = args[i]
        out[key.replace("-", "_")] = value
        i += 1
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: {part!r} is a value, not a section")
        node[leaf] = value
    return nested


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Type-check (YAML) or convert (CLI strings) `value` to the annotated type `tp`."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: {value!r} is not allowed{hint}; choose {_describe(tp)}")
    if origin in (typing.Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in get_args(tp):
                return None
        for option in options:
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue  # the next option may take it; the error below names them all
        raise ConfigError(f"{where}: {value!r} matches none of {[_describe(o) for o in options]}")
    if origin is list:
        (item_tp,) = get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):  # inf / nan would only surface later as a NaN loss
            raise ConfigError(f"{where}: {value!r} is not allowed; use a finite number")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _did_you_mean(cls: type, key: str, where: str) -> str:
    """A close spelling at this level, else the section one level down that has `key` (`compile` ->
    `train.compile`): users often forget which section an option lives in."""
    prefix = where + "." if where else ""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    if close:
        return f"; did you mean {prefix + close[0]!r}?"
    hints = typing.get_type_hints(cls)
    for name in names:
        section = hints[name]
        if dataclasses.is_dataclass(section) and key in {f.name for f in dataclasses.fields(section)}:
            return f"; did you mean {prefix + name + '.' + key!r}?"
    return ""


def build_dataclass(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Instantiate `cls` from a nested dict, naming any bad field with its dotted path."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a section (mapping), got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            hint = _did_you_mean(cls, key, where) or "."
            raise ConfigError(f"{path}: unknown key{hint} Valid keys here: {sorted(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value, path)
        else:
            kwargs[key] = _coerce(value, tp, path)
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> JobConfig:
    """The resolved JobConfig: defaults, then the YAML file, then CLI overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
        raw = loaded
    if overrides:
        flat = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
        raw = _merge(raw, _nest(flat))

    recipe_name = _coerce(raw.get("recipe", JobConfig.recipe), str, "recipe")
    recipe = get_recipe(recipe_name)
    sections = {k: raw.pop(k, {}) or {} for k in _RECIPE_SECTIONS}
    cfg = build_dataclass(JobConfig, raw)
    cfg.model = build_dataclass(recipe.model.config, sections["model"], "model")
    cfg.data = build_dataclass(recipe.data.config, sections["data"], "data")
    return cfg


def field_help(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted name, help, default) for every leaf field — the source of `config help`."""
    rows = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        if dataclasses.is_dataclass(default):
            rows.extend(field_help(type(default), name + "."))
        else:
            rows.append((name, f.metadata.get("help", ""), default))
    return rows
