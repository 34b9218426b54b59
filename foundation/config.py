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
from dataclasses import MISSING, field, fields
from pathlib import Path
from typing import Any, TypeVar

from foundation.errors import ConfigError

C = TypeVar("C")
SUFFIXES = (".toml", ".yaml", ".yml", ".json")


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


def _parse(p: Path) -> Any:
    import yaml

    try:
        if p.suffix == ".toml":
            return _load_toml(p)
        if p.suffix in (".yaml", ".yml"):
            return yaml.safe_load(p.read_text()) or {}
        return json.loads(p.read_text())
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as e:  # TOML/JSON errors: ValueError
        raise ConfigError(f"--config {p}: cannot parse: {str(e).splitlines()[0]}") from None


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
    unknown = sorted(set(options) - {f.name for f in fields(cls)})
    if unknown:
        raise ConfigError(
            f"--config {p}: unknown options {unknown}; see `latentdit {command} --help`"
        )
    return options


def resolve_config(
    cls: type[C],
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    command: str = "COMMAND",
) -> C:
    """Defaults, then the file's options, then `overrides` (None values mean 'not given')."""
    options = read_config_file(config_file, cls, command) if config_file else {}
    options.update({k: v for k, v in (overrides or {}).items() if v is not None})
    missing = [
        f.name
        for f in fields(cls)
        if f.default is MISSING and f.default_factory is MISSING and f.name not in options
    ]
    if missing:
        flags = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise ConfigError(f"latentdit {command}: missing {flags} (give it, or put it in --config)")
    try:
        return cls(**options)
    except TypeError as e:
        raise ConfigError(f"bad {command} options: {e}") from None


def replace(cfg: C, **changes: Any) -> C:
    """`dataclasses.replace`, re-running the config's checks."""
    return dataclasses.replace(cfg, **changes)
