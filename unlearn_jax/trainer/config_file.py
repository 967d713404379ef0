"""Config files (`configs/*.py` with `get_config(arg)`) and `--config.a.b=value` overrides.

The same semantics as ml_collections' `config_flags.DEFINE_config_file`:
`--config path/to/file.py:ARG` imports the file and calls `get_config(ARG)`
(or `get_config()` without ARG); each `--config.a.b=value` then sets a field
that must exist, the value parsed for the field's type (bool: true/false/1/0;
int, float; tuples/lists/dicts as Python literals; None-valued fields: a
Python literal if it parses, else the string). A prompt-set field may switch
between a list of strings and a file path in either direction.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import ml_collections

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def import_config_module(path: str | Path, sibling: str | None = None) -> ModuleType:
    """Imports a config file by path; with `sibling`, the file of that name next to `path`.

    Presets use it to build on base.py whatever the working directory:
    `base = import_config_module(__file__, "base.py")`.
    """
    path = Path(path)
    if sibling is not None:
        path = path.parent / sibling
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    name = f"unlearn_config_{path.stem}_{abs(hash(str(path.absolute())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`FILE.py[:ARG]` -> get_config(ARG)."""
    path, _, arg = spec.partition(":")
    module = import_config_module(path)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} has no get_config(arg) function")
    return module.get_config(arg) if arg else module.get_config()


def _parse_value(text: str, current, field_type, name: str):
    if field_type is bool or isinstance(current, bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"--config.{name}={text!r}: expected a bool (true/false)")
    if field_type is str or isinstance(current, str):
        # A list of strings where a path was (prompt sets are "a list or a file").
        if text.lstrip().startswith(("[", "(")):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return text
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return list(value)
        return text
    if field_type in (int, float) or isinstance(current, (int, float)):
        kind = field_type if field_type in (int, float) else type(current)
        try:
            return kind(text) if kind is float else int(text)
        except ValueError:
            raise ValueError(f"--config.{name}={text!r}: expected {kind.__name__}") from None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # e.g. a file path where a list of prompts was


def _all_fields(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    names = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            names.extend(_all_fields(value, name + "."))
        else:
            names.append(name)
    return names


def apply_override(config: ml_collections.ConfigDict, name: str, text: str) -> None:
    """Sets the existing field `name` ('a.b.c') from its command-line text."""
    *parents, leaf = name.split(".")
    node = config
    for part in parents:
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if node is None:
            break
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        close = difflib.get_close_matches(name, _all_fields(config), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"--config.{name}: the config has no field {name!r}.{hint}")
    current = node[leaf]
    value = _parse_value(text, current, node.get_type(leaf), name)
    try:
        node[leaf] = value
    except TypeError:
        if not isinstance(value, (str, list, tuple)):
            raise
        # A list <-> file-path switch of a prompt set: replace the field.
        del node[leaf]
        node[leaf] = value


def split_overrides(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """([(field, text)], rest) from '--config.a.b=v' / '--config.a.b v' arguments."""
    overrides, rest = [], []
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--config."):
            name, eq, value = item[len("--config.") :].partition("=")
            if not eq:
                if i + 1 >= len(items):
                    raise ValueError(f"{item} needs a value (--config.{name}=VALUE)")
                value = items[i + 1]
                i += 1
            overrides.append((name, value))
        else:
            rest.append(item)
        i += 1
    return overrides, rest


def load_config(spec: str, overrides: Sequence[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
    """The config of `FILE.py[:ARG]` with `overrides` applied in order."""
    config = load_config_file(spec)
    for name, text in overrides:
        apply_override(config, name, text)
    return config
