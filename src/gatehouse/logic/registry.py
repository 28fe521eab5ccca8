"""``@gatehouse.rpc`` and loading a project's ``logic/`` package.

A function marked ``@gatehouse.rpc`` takes a :class:`~gatehouse.logic.context.Context` first and then typed
parameters; the parameters become a pydantic model (so a request's JSON is validated before the function
runs) and the return annotation a pydantic type adapter (so the result is serialised the same way every time).
Functions are granted to apps by name (``[apps.x] functions = ["order_total"]``).
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar, get_type_hints, overload

from pydantic import BaseModel, ConfigDict, TypeAdapter, create_model

from gatehouse.errors import ProjectError

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
_MARK = "__gatehouse_rpc__"


@dataclass(frozen=True, slots=True)
class RpcOptions:
    read_only: bool
    name: str | None
    database: str | None


@overload
def rpc(function: F, /) -> F: ...
@overload
def rpc(*, read_only: bool = False, name: str | None = None, database: str | None = None) -> Callable[[F], F]: ...


def rpc(function: F | None = None, /, *, read_only: bool = False, name: str | None = None,
        database: str | None = None) -> F | Callable[[F], F]:
    """Publish an async function as ``POST /rpc/<name>`` (and ``GET`` when ``read_only``).

    ``database`` names the project database its contracts live in (default: the first one declared)."""

    def mark(fn: F) -> F:
        is_async = inspect.iscoroutinefunction(fn)  # kept apart: used as a condition, it would narrow fn's type
        if not is_async:
            raise TypeError(f"@gatehouse.rpc needs an async function; {fn.__qualname__} is not")
        setattr(fn, _MARK, RpcOptions(read_only=read_only, name=name, database=database))
        return fn

    return mark(function) if function is not None else mark


@dataclass(frozen=True, slots=True)
class LogicFunction:
    name: str
    function: Callable[..., Awaitable[Any]]
    parameters: type[BaseModel]
    result: TypeAdapter[Any]
    read_only: bool
    description: str
    database: str | None = None

    async def call(self, context: Any, arguments: BaseModel) -> Any:
        return await self.function(context, **{k: getattr(arguments, k) for k in type(arguments).model_fields})


def describe(function: Callable[..., Awaitable[Any]], options: RpcOptions) -> LogicFunction:
    signature = inspect.signature(function)
    hints = get_type_hints(function)
    params = list(signature.parameters.values())
    if not params:
        raise TypeError(f"{function.__qualname__} must take the context as its first parameter")
    fields: dict[str, Any] = {}
    for param in params[1:]:
        if param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            raise TypeError(f"{function.__qualname__}: *args and **kwargs cannot be published")
        if param.name not in hints:
            raise TypeError(f"{function.__qualname__}: parameter {param.name!r} needs a type annotation")
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (hints[param.name], default)
    name = options.name or function.__name__
    model = create_model(f"{name}_parameters", __config__=ConfigDict(extra="forbid"), **fields)
    result = TypeAdapter(hints.get("return", Any))
    return LogicFunction(name, function, model, result, options.read_only, inspect.getdoc(function) or "",
                         options.database)


def import_logic(root: Path, package: str) -> list[tuple[str, ModuleType]]:
    """Import ``root/logic`` (a package or loose modules): (file, module) of each, for the collectors of what
    they declare (functions here, sagas in ``gatehouse.sagas.declare``), which so share one import."""
    folder = root / "logic"
    if not folder.is_dir():
        return []
    modules: list[tuple[str, ModuleType]] = []
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("test_") or path.name == "__init__.py":
            continue
        module_name = f"{package}.{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the user's code: report it as a project error with its place
            raise ProjectError(f"importing it failed: {type(exc).__name__}: {exc}", where=str(path)) from None
        modules.append((str(path), module))
    return modules


def published_functions(modules: list[tuple[str, ModuleType]]) -> dict[str, LogicFunction]:
    """The ``@gatehouse.rpc`` functions defined in the imported modules, by name."""
    functions: dict[str, LogicFunction] = {}
    for path, module in modules:
        for value in vars(module).values():
            options = getattr(value, _MARK, None)
            if isinstance(options, RpcOptions) and getattr(value, "__module__", None) == module.__name__:
                try:
                    described = describe(value, options)
                except TypeError as exc:
                    raise ProjectError(str(exc), where=path) from None
                if described.name in functions:
                    raise ProjectError(f"two functions are published as {described.name!r}", where=path)
                functions[described.name] = described
    return functions


def load_logic(root: Path, package: str) -> dict[str, LogicFunction]:
    """Import ``root/logic`` and collect its published functions."""
    return published_functions(import_logic(root, package))
