"""Option files and the one way options become a config dataclass.

    cfg = resolve_config(TrainConfig, "run.toml", {"steps": 1000})   # defaults < file < overrides

Every long-running command's config is a frozen, keyword-only dataclass whose fields carry their
help text (`option(default, help)`); the CLI reads default and help from the field, and a
`--config FILE` (TOML, YAML, or the JSON a run saved) fills in what the command line leaves out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import typing
from dataclasses import MISSING, field, fields
from pathlib import Path
from typing import Any, TypeVar

from foundation.errors import ConfigError

C = TypeVar("C")
SUFFIXES = (".toml", ".yaml", ".yml", ".json")
CONFIG_MAX_BYTES = 1 << 20  # a run's config.json is ~3 KB; nothing legitimate comes near this


class _Null:
    """An option explicitly set to None (e.g. `--no-grad-clip`), unlike None: 'not given'."""

    def __repr__(self) -> str:
        return "NULL"


NULL = _Null()


def option(default: Any = MISSING, help: str = "", **cli: Any) -> Any:
    """A config field with its help text; no default makes it a required option.

    `cli` holds plain hints for the command line, read by `cli.py` (libraries never import
    Typer): `flags` (a tuple of option names, e.g. ("--class",)), `argument` (a positional
    argument), `min` / `max`, `exists` / `file_okay` / `dir_okay` (paths), `hidden`, `cli=False`
    (not an option: filled in by the command itself).
    """
    metadata = {"help": help, "cli": cli}
    if default is MISSING:
        return field(metadata=metadata)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def field_help(cls: type) -> dict[str, str]:
    """{field name: help text} of a config dataclass."""
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def field_defaults(cls: type) -> dict[str, Any]:
    """{field name: default} of a config dataclass's fields that have one."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def _load_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # the same parser, packaged for 3.10 (a declared dependency there)
        import tomli as tomllib
    return tomllib.loads(path.read_text())


def _load_yaml(text: str) -> Any:
    """YAML through a safe loader that refuses aliases: an option file needs none, and nested
    aliases expand exponentially (a 500-byte "billion laughs" file takes gigabytes)."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(
                    f"YAML aliases (*name) are not allowed in option files (line {mark.line + 1}); "
                    "write the values out"
                )
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=NoAliasLoader)  # a SafeLoader: tags are refused


def _parse(p: Path) -> Any:
    import yaml

    size = p.stat().st_size
    if size > CONFIG_MAX_BYTES:
        raise ConfigError(
            f"--config {p}: {size} bytes, more than an option file needs (at most "
            f"{CONFIG_MAX_BYTES}); give a file of options"
        )
    try:
        if p.suffix == ".toml":
            return _load_toml(p)
        if p.suffix in (".yaml", ".yml"):
            return _load_yaml(p.read_text()) or {}
        return json.loads(p.read_text())
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as e:  # TOML/JSON errors: ValueError
        raise ConfigError(f"--config {p}: cannot parse: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"--config {p}: cannot parse: nested too deeply") from None


def _field_names(cls: type) -> set[str]:
    """Field names of a config, with those of its nested config dataclasses (flattened)."""
    hints = typing.get_type_hints(cls)
    names = set()
    for f in fields(cls):
        names.add(f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            names |= _field_names(hints[f.name])
    return names


def read_config_file(path: str | os.PathLike, cls: type, command: str) -> dict[str, Any]:
    """Options for `cls` from a .toml, .yaml/.yml or .json file ('-' may stand for '_' in keys)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {p}: no such file")
    if p.suffix not in SUFFIXES:
        raise ConfigError(f"--config {p}: use a {', '.join(SUFFIXES)} file")
    raw = _parse(p)
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {p}: expected a table of options at the top level")
    options = {k.replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(options) - _field_names(cls))
    if unknown:
        raise ConfigError(
            f"--config {p}: unknown options {unknown}; see `latentdit {command} --help`"
        )
    return options


def _coerce(annotation: Any, value: Any) -> Any:
    """A value read from a file as its field's type: str to Path, list to tuple."""
    types = {a for a in typing.get_args(annotation) if a is not type(None)} or {annotation}
    if isinstance(value, str) and Path in types and str not in types:
        return Path(value)
    if isinstance(value, list) and any(typing.get_origin(t) is tuple for t in types):
        return tuple(value)
    return value


def _build(cls: type[C], options: dict[str, Any], command: str) -> C:
    """`cls(**options)`, nested config dataclasses built from their own (flattened) options."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        sub = hints[f.name]
        if dataclasses.is_dataclass(sub) and not isinstance(options.get(f.name), sub):
            given = options.pop(f.name, None) or {}
            mine = {n.name: options.pop(n.name) for n in fields(sub) if n.name in options}
            kwargs[f.name] = _build(sub, {**given, **mine}, command)
    kwargs.update({k: None if v is NULL else _coerce(hints.get(k), v) for k, v in options.items()})
    missing = [
        f.name.upper()
        if f.metadata.get("cli", {}).get("argument")
        else "--" + f.name.replace("_", "-")
        for f in fields(cls)
        if f.default is MISSING and f.default_factory is MISSING and f.name not in kwargs
    ]
    if missing:
        flags = ", ".join(missing)
        raise ConfigError(f"latentdit {command}: missing {flags} (give it, or put it in --config)")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad {command} options: {e}") from None


def resolve_config(
    cls: type[C],
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    command: str = "COMMAND",
    base: dict[str, Any] | None = None,
) -> C:
    """Defaults < `base` (a preset, or a run's saved config) < the file's options < `overrides`.

    None values in `overrides` mean 'not given'. Nested config dataclasses take their options
    flattened (`steps` for a sample's `solve.steps`) or as a table under their field's name.
    """
    options = dict(base or {})
    from_file = read_config_file(config_file, cls, command) if config_file else {}
    # in a file, null sets an option to None; on the command line, None means "not given"
    for layer in ({k: NULL if v is None else v for k, v in from_file.items()}, overrides):
        for key, value in (layer or {}).items():
            if value is None:
                continue
            if isinstance(value, dict) and isinstance(options.get(key), dict):
                options[key] = {**options[key], **value}
            else:
                options[key] = value
    return _build(cls, options, command)


def replace(cfg: C, **changes: Any) -> C:
    """`dataclasses.replace`, re-running the config's checks."""
    return dataclasses.replace(cfg, **changes)
