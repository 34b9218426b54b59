"""Typer commands generated from config dataclasses: one path from an option to its field.

    app.command("train")(config_command(TrainConfig, run_train, name="train"))

Every field of the config becomes an option (or, with the hint `argument=True`, a positional
argument) whose help is the field's help text (its `option(...)` help, else its attribute
docstring) and whose shown default is the field's default. Options left out arrive as None, so the
one resolve function (`foundation.config.resolve_config`) fills them from `--config FILE`, then from
the dataclass defaults; the command line wins. Nested config dataclasses (e.g. a sample's solver
settings) are flattened into the same command.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import typer

from foundation.config import NULL

CONFIG_HELP = (
    "A .toml, .yaml or .json file of options (a run's config.json works); options given here win."
)
METAVARS = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH"}


@cache
def attribute_docs(cls: type) -> dict[str, str]:
    """{field: its attribute docstring, on one line} of a dataclass (the string after the field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_help(cls: type, f: dataclasses.Field) -> str:
    """The help text of a field: its `option(help=...)`, else its attribute docstring."""
    return f.metadata.get("help") or attribute_docs(cls).get(f.name, "")


def _hints(f: dataclasses.Field) -> dict[str, Any]:
    return dict(f.metadata.get("cli", {}))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value)) if value else "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def cli_type(annotation: Any) -> tuple[Any, bool]:
    """(the type Typer parses, whether the value is many) for a field's annotation."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return cli_type(rest[0])
        return (Path if set(rest) == {str, Path} else str), False  # e.g. int | float: parsed later
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return list[args[0]], True
    if origin is tuple:
        return annotation, False
    return annotation, False


@dataclasses.dataclass(frozen=True)
class Param:
    """One command-line parameter and the config field (or nested field) it fills."""

    name: str
    path: tuple[str, ...]  # field names from the top config down to this one
    parameter: inspect.Parameter
    annotation: Any


def _none_flag(f: dataclasses.Field, path: tuple[str, ...], flag: str, help: str) -> Param:
    info = typer.Option(False, flag, help=help, show_default=False)
    return Param(
        f"{f.name}__null", (*path[:-1], f"{f.name}__null"), _kw(f"{f.name}__null", info), bool
    )


def _param(cls: type, f: dataclasses.Field, annotation: Any, path: tuple[str, ...]) -> Param:
    hints = _hints(f)
    typ, many = cli_type(annotation)
    default = _default(f)
    text = field_help(cls, f)
    if hints.get("argument"):
        required = default is dataclasses.MISSING
        info = typer.Argument(
            ... if required else None,
            help=text,
            metavar=f.name.upper(),
            show_default=False,
            **{k: hints[k] for k in ("exists", "file_okay", "dir_okay") if k in hints},
        )
        return Param(f.name, path, _kw(f.name, info), typ if required else typ | None)
    shown = (
        " [required]"
        if default is dataclasses.MISSING
        else ""
        if default is None or default == ()
        else f" [default: {_show(default)}]"
    )
    flags = hints.get("flags") or ("--" + f.name.replace("_", "-"),)
    if typ is bool and not hints.get("flags"):
        flags = (f"{flags[0]}/--no-{flags[0][2:]}",)
    extra = {k: hints[k] for k in ("min", "max", "exists", "file_okay", "dir_okay") if k in hints}
    info = typer.Option(
        None,
        *flags,
        help=f"{text}{shown}",
        show_default=False,
        metavar=_metavar(typ, many),
        hidden=hints.get("hidden", False),
        **extra,
    )
    return Param(f.name, path, _kw(f.name, info), typ | None)


def _metavar(typ: Any, many: bool) -> str | None:
    if typ is bool:
        return None
    if typing.get_origin(typ) is tuple:
        return " ".join(METAVARS.get(a, "TEXT") for a in typing.get_args(typ))
    if many:
        return METAVARS.get(typing.get_args(typ)[0], "TEXT")
    return METAVARS.get(typ, "TEXT")


def _kw(name: str, info: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info)


def config_params(cls: type, path: tuple[str, ...] = ()) -> list[Param]:
    """The parameters of a config dataclass, nested configs flattened into the same list."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        if not f.init or _hints(f).get("cli", True) is False:
            continue
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            params += config_params(annotation, (*path, f.name))
        else:
            params.append(_param(cls, f, annotation, (*path, f.name)))
            if "none_flag" in _hints(f):
                flag, text = _hints(f)["none_flag"]
                params.append(_none_flag(f, (*path, f.name), flag, text))
    return params


def collect(params: list[Param], values: dict[str, Any]) -> dict[str, Any]:
    """Given values (None: not given) as nested overrides keyed like the config's fields."""
    out: dict[str, Any] = {}
    for p in params:
        value = values.get(p.name)
        key = p.path[-1]
        if p.name.endswith("__null"):  # e.g. --no-grad-clip: the field set to None
            value, key = (NULL if value else None), key.removesuffix("__null")
        if value is None:
            continue
        if isinstance(value, list):
            value = tuple(value)
        node = out
        for part in p.path[:-1]:
            node = node.setdefault(part, {})
        node[key] = value
    return out


def config_command(
    cls: type,
    run: Callable[..., Any],
    *,
    name: str,
    config_file: bool = True,
    extra: tuple[inspect.Parameter, ...] = (),
    base: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
    help: str | None = None,
) -> Callable[..., Any]:
    """A Typer command whose options are `cls`'s fields; it resolves the config and calls `run`.

    `run(cfg, **extras)` receives the resolved config and the values of the `extra` parameters.
    `base(values)` may return options that rank above the defaults and below `--config` and the
    command line: a preset (`--quick`), or the saved config of the run being resumed.
    """
    from foundation.config import resolve_config

    params = config_params(cls)
    taken = {p.name for p in params}
    config_param = _kw("config", typer.Option(None, "--config", help=CONFIG_HELP, metavar="FILE"))
    extras = [*extra, *([config_param] if config_file else [])]
    assert not taken & {e.name for e in extras}, "extra parameters shadow config fields"

    def command(**values: Any) -> Any:
        overrides = collect(params, values)
        extra_values = {e.name: values[e.name] for e in extra}
        cfg = resolve_config(
            cls,
            values.get("config"),
            overrides,
            command=name,
            base=base(values) if base else None,
        )
        return run(cfg, **extra_values)

    signature = [p.parameter for p in params if p.parameter.default.default is ...]
    signature += [p.parameter for p in params if p.parameter.default.default is not ...]
    command.__signature__ = inspect.Signature([*signature, *extras])  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params} | {
        e.name: e.annotation if e.annotation is not inspect.Parameter.empty else Path | None
        for e in extras
    }
    command.__doc__ = help or (cls.__doc__ or "").strip().splitlines()[0]
    command.__name__ = name
    return command
