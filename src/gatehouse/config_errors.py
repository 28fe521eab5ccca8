"""pydantic's validation errors of ``gatehouse.toml``, said the way a person fixes them.

Each line names the full key (``apps.web.quota.pool_sise``), what was given, and what is allowed: the
valid keys at that place with the closest one suggested ("did you mean pool_size?"), the allowed values or
range. A value that came from an environment override names its variable, since that is where to fix it.
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Mapping
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import ErrorDetails

ENV_PREFIX = "GATEHOUSE_"
KeyPath = tuple[str | int, ...]

_NAME_RULE = "a name: a lower-case letter, then lower-case letters, digits or _ (40 at most)"
_PATTERNS = {
    r"^[a-z][a-z0-9_]{0,39}$": _NAME_RULE,
    r"^v[1-9][0-9]{0,3}$": "an API version: v1, v2, ...",
    r"^[a-z][a-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$": "contract.column, e.g. orders.customer_id",
}
_TYPES = {"int_parsing": "a whole number", "int_type": "a whole number", "int_from_float": "a whole number",
          "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false",
          "bool_type": "true or false", "string_type": "text (in quotes)", "date_parsing": "a date (2027-06-30)",
          "date_type": "a date (2027-06-30)", "dict_type": "a table ([section] or { key = value })",
          "model_type": "a table ([section] or { key = value })", "tuple_type": "a list ([...])",
          "list_type": "a list ([...])"}
_BOUNDS = {"greater_than_equal": ("ge", "at least"), "less_than_equal": ("le", "at most"),
           "greater_than": ("gt", "more than"), "less_than": ("lt", "less than")}


def env_variable(path: KeyPath) -> str:
    """The environment variable that overrides a key: ``GATEHOUSE_SERVER__PORT`` for ``server.port``."""
    return ENV_PREFIX + "__".join(str(part).upper() for part in path)


def key_text(path: KeyPath) -> str:
    """``apps.web.grants[0].actions`` for a path of keys and list positions."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(the top level)"


def describe_errors(errors: list[ErrorDetails], data: Mapping[str, Any], root: type[BaseModel],
                    from_env: Mapping[KeyPath, str]) -> list[str]:
    """One line per problem (the same key reported twice, as unions do, is said once)."""
    lines: list[str] = []
    seen: set[KeyPath] = set()
    for error in errors:
        path, key_error = _data_path(error, data)
        if path in seen:
            continue
        seen.add(path)
        lines.append(_describe(error, path, key_error, root, from_env))
    return lines


def _data_path(error: ErrorDetails, data: Mapping[str, Any]) -> tuple[KeyPath, bool]:
    """The error's location as keys of the input (pydantic adds union members and ``[key]`` to it)."""
    path: list[str | int] = []
    node: Any = data
    loc = error["loc"]
    for index, part in enumerate(loc):
        if part == "[key]":
            return tuple(path), True
        present = (isinstance(node, Mapping) and part in node) or (
            isinstance(node, list | tuple) and isinstance(part, int) and part < len(node))
        if present:
            node = node[part]
        elif index == len(loc) - 1 and error["type"] == "missing":
            pass
        else:
            continue  # a union member's name: not a key of the file
        path.append(part)
    return tuple(path), False


def _describe(error: ErrorDetails, path: KeyPath, key_error: bool, root: type[BaseModel],
              from_env: Mapping[KeyPath, str]) -> str:
    kind, given, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    env_path, variable = _variable_for(path, from_env)
    origin = f" (from {variable} in the environment)" if variable else ""
    key = key_text(path)
    if key_error:
        rule = _PATTERNS.get(str(ctx.get("pattern")), error["msg"])
        return f"{key}: the name {path[-1]!r}{origin} must be {rule}" if path else f"{error['msg']}"
    if kind == "extra_forbidden":
        return _unknown_key(path, given, root, env_path, variable)
    if kind == "missing":
        parent = key_text(path[:-1])
        place = f"under [{parent}]" if path[:-1] else "at the top of the file"
        example = f"[{path[-1]}]" if _is_section(root, path) else f"{path[-1]} = ..."
        return f"{key}: required, but missing; add {example} {place}"
    shown = _shown(given)
    if kind == "string_pattern_mismatch":
        rule = _PATTERNS.get(str(ctx.get("pattern")), f"text matching {ctx.get('pattern')}")
        return f"{key} = {shown}{origin}: must be {rule}"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        close = difflib.get_close_matches(str(given), choices, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{key} = {shown}{origin}: must be one of {', '.join(map(repr, choices))}{hint}"
    if kind in _TYPES:
        return f"{key} = {shown}{origin}: must be {_TYPES[kind]}"
    if kind in _BOUNDS:
        name, words = _BOUNDS[kind]
        return f"{key} = {shown}{origin}: must be {words} {ctx.get(name)}"
    if kind in ("too_short", "too_long") and isinstance(given, Mapping | list | tuple):
        return f"{key}{origin}: {_plain(error['msg'])}"
    if kind == "value_error":
        return f"{key}{origin}: {_plain(error['msg'].removeprefix('Value error, '))}".replace(
            "VARIABLE", _suggested_variable(path))
    return f"{key} = {shown}{origin}: {_plain(error['msg'])}"


def _unknown_key(path: KeyPath, given: Any, root: type[BaseModel], env_path: KeyPath,
                 variable: str | None) -> str:
    valid = _valid_keys(root, path[:-1])
    name = str(path[-1])
    what = "section" if isinstance(given, Mapping) else "setting"
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if variable:
        fix = f"; did you mean {env_variable((*path[:-1], close[0], *env_path[len(path):]))}?" if close else ""
        if env_path == path:
            return f"{variable} (in the environment) sets {key_text(path)}, which is not a {what}{fix}"
        return f"{variable} (in the environment) sets {key_text(env_path)}, but there is no {what} {name}{fix}"
    fix = f"; did you mean {close[0]}?" if close else ""
    place = f" in [{key_text(path[:-1])}]" if path[:-1] else ""
    listed = f" (valid{place}: {', '.join(valid)})" if valid else ""
    return f"{key_text(path)}: unknown {what}{fix}{listed}"


def _variable_for(path: KeyPath, from_env: Mapping[KeyPath, str]) -> tuple[KeyPath, str | None]:
    """The override (its key path and variable) that set ``path`` or something under it, if any."""
    for env_path, variable in from_env.items():
        if env_path[: len(path)] == path or path[: len(env_path)] == env_path:
            return env_path, variable
    return (), None


def _suggested_variable(path: KeyPath) -> str:
    """A conventional variable name for a secret: ``SHOP_DATABASE_URL`` for ``databases.shop.url``."""
    if len(path) == 3 and path[0] == "databases" and path[2] == "url":
        return f"{str(path[1]).upper()}_DATABASE_URL"
    return "_".join(str(part).upper() for part in path[1:] if not isinstance(part, int)) or "VARIABLE"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _plain(message: str) -> str:
    message = message.replace("Input should be", "must be").replace("String should", "must")
    return message[:1].lower() + message[1:]


def _strip(annotation: Any) -> Any:
    """``X`` from ``Annotated[X, ...]`` and from ``X | None``."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _annotation_at(root: type[BaseModel], path: KeyPath) -> Any:
    """The type of the value at ``path`` in the model tree, or None when it cannot be followed."""
    annotation: Any = root
    for part in path:
        annotation = _strip(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields = {field.alias or name: field for name, field in annotation.model_fields.items()}
            if part not in fields:
                return None
            annotation = fields[str(part)].annotation
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        elif get_origin(annotation) in (tuple, list):
            annotation = get_args(annotation)[0]
        else:
            return None
    return _strip(annotation)


def _valid_keys(root: type[BaseModel], path: KeyPath) -> list[str]:
    model = _annotation_at(root, path)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [field.alias or name for name, field in model.model_fields.items()]
    return []


def _is_section(root: type[BaseModel], path: KeyPath) -> bool:
    found = _annotation_at(root, path)
    return get_origin(found) is dict or (isinstance(found, type) and issubclass(found, BaseModel))
