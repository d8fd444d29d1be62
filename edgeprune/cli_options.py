"""CLI options generated from the typed configuration (edgeprune/config.py).

``config_options(config=PruneConfig, load=ModelLoad)`` turns a command ``fn(config: PruneConfig, load:
ModelLoad, ...)`` into a Typer command whose options are the dataclasses' fields: name (``--field-name`` or the
field's ``flag``), type, default and help all come from the field, so `edgeprune prune`, the ``[prune]`` section
of `edgeprune run` and ``PruneConfig`` cannot drift apart. The command receives the built, validated-by-type
objects; semantic checks (``validate()``) stay with the caller.

Not here: the commands themselves (cli.py).
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import fields
from typing import Annotated, Any

import typer

from edgeprune.config import coerce, default_of, field_types


def cli_fields(cls, only: tuple[str, ...] | None = None) -> list[tuple[str, str, Any]]:
    """(parameter name, flag, field) of every CLI field of ``cls``, in declaration order."""
    out = []
    for f in fields(cls):
        if not f.metadata.get("cli", True) or (only is not None and f.name not in only):
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        out.append((flag[2:].replace("-", "_"), flag, f))
    return out


def _optional_scalar(tp: Any) -> type | None:
    """``X`` for ``X | None`` with a scalar X, else None."""
    args = typing.get_args(tp)
    rest = [a for a in args if a is not type(None)]
    return rest[0] if type(None) in args and len(rest) == 1 and rest[0] in (int, float, str) else None


def _parameter(pname: str, flag: str, f, tp: Any) -> inspect.Parameter:
    default = default_of(f)
    help_ = f.metadata.get("help", "")
    scalar = _optional_scalar(tp)
    if tp is bool:
        decl, ann, cli_default = (f"{flag}/--no-{flag[2:]}",), bool, default
    elif tp in (int, float, str):
        decl, ann, cli_default = (flag,), tp, default
    elif scalar is not None:  # int | None and the like: not given = None
        decl, ann, cli_default = (flag,), scalar | None, default
    else:  # lists and str | list[str]: one CLI string (comma-separated for lists)
        decl, ann = (flag,), str | None
        cli_default = None if isinstance(default, list) else default
        if isinstance(default, list) and default:
            help_ += f" (default: {','.join(map(str, default))})"
    return inspect.Parameter(pname, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=cli_default,
                             annotation=Annotated[ann, typer.Option(*decl, help=help_)])


def config_options(only: dict[str, tuple[str, ...]] | None = None, **sections: type) -> typing.Callable:
    """Decorator: replace the command's parameters named in ``sections`` (name -> dataclass) by the
    dataclass's fields as options (``only[name]``: a subset of the fields)."""
    only = only or {}

    def wrap(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for name, p in sig.parameters.items() if name not in sections]
        taken = {p.name for p in own}
        owners: dict[str, tuple[str, str, str]] = {}
        added = []
        for section, cls in sections.items():
            types_ = field_types(cls)
            for pname, flag, f in cli_fields(cls, only.get(section)):
                if pname in taken:
                    raise TypeError(f"option --{pname} of {cls.__name__} clashes with a parameter of {fn.__name__}")
                taken.add(pname)
                owners[pname] = (section, f.name, flag)
                added.append(_parameter(pname, flag, f, types_[f.name]))

        @functools.wraps(fn)
        def command(**kwargs):
            values: dict[str, dict] = {s: {} for s in sections}
            for pname, (section, fname, flag) in owners.items():
                value = kwargs.pop(pname)
                if value is not None:
                    values[section][fname] = coerce(field_types(sections[section])[fname], value, flag)
            return fn(**{s: cls(**values[s]) for s, cls in sections.items()}, **kwargs)

        command.__signature__ = sig.replace(parameters=own + added)
        command.__annotations__ = {p.name: p.annotation for p in own + added}
        return command

    return wrap
