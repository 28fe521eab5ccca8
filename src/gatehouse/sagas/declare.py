"""Declaring sagas and their steps: ``@gatehouse.step`` and ``@gatehouse.saga`` in a project's ``logic/``.

A *step* is one unit of work that is recorded once done:

* a local step (``@gatehouse.step(database="shop")``) takes a :class:`~gatehouse.logic.context.Context` and
  acts through contracts as the saga's app, in one transaction on that database; its record commits in that
  same transaction, so it happens exactly once;
* a remote step (``@gatehouse.step(remote=True)``) takes a :class:`RemoteCall` (a stable idempotency key and an
  HTTP client) and calls another service; it is recorded after it returns, so a crash in between sends it
  again *with the same key*, and the other service is expected to deduplicate on it.

A *saga* is an async function ``(s: Saga, input) -> result`` that calls its steps through ``s.step``. Both
decorators leave the function's types visible to mypy: ``await s.step(reserve_stock, items)`` has the type
``reserve_stock`` returns. Types are read lazily (at first use, once the module is fully imported), so
annotations may name classes defined further down the module.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Concatenate, Generic, Literal, ParamSpec, TypeVar, get_type_hints, overload

from pydantic import TypeAdapter

from gatehouse.errors import ProjectError

if TYPE_CHECKING:
    import httpx

    from gatehouse.logic.context import Context
    from gatehouse.sagas.replay import Saga

P = ParamSpec("P")
R = TypeVar("R")
In = TypeVar("In")
Out = TypeVar("Out")

DEFAULT_STEP_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 0.5


@dataclass(frozen=True, slots=True)
class RemoteCall:
    """What a remote step gets: send ``idempotency_key`` with the request (e.g. as an ``Idempotency-Key``
    header) so that the other service applies a call sent twice (after a crash) only once."""

    saga_id: str
    n: int
    idempotency_key: str
    """``"<saga id>:<n>"`` for step n, ``"<saga id>:<n>:undo"`` for its compensation: the same on every attempt."""
    http: httpx.AsyncClient
    attempt: int
    """1 on the first try, then 2, 3... (after transient failures)."""


class Step(Generic[P, R]):
    """A step function with its options; call it through ``Saga.step``, never directly."""

    def __init__(self, function: Callable[..., Awaitable[Any]], *, database: str | None, remote: bool,
                 timeout_s: float, retries: int, backoff_s: float, name: str | None) -> None:
        if not inspect.iscoroutinefunction(function):
            raise TypeError(f"@gatehouse.step needs an async function; {function.__qualname__} is not")
        if remote and database is not None:
            raise TypeError(f"{function.__qualname__}: a remote step acts on no database; drop database=")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise TypeError(f"{function.__qualname__}: timeout_s must be > 0, retries and backoff_s >= 0")
        self.function = function
        self.name = name or function.__name__
        self.database = database
        self.remote = remote
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.module = function.__module__
        self._result: TypeAdapter[Any] | None = None
        self._first: TypeAdapter[Any] | None = None

    def __repr__(self) -> str:
        return f"<step {self.name}>"

    def _hints(self) -> dict[str, Any]:
        try:
            return get_type_hints(self.function)
        except NameError as exc:
            raise ProjectError(f"step {self.name!r}: an annotation does not resolve ({exc})") from None

    @property
    def result(self) -> TypeAdapter[Any]:
        """Serialises the step's result to its record and reads it back on replay."""
        if self._result is None:
            self._result = TypeAdapter(self._hints().get("return", Any))
        return self._result

    @property
    def first_parameter(self) -> TypeAdapter[Any]:
        """The type of the value after the context: a compensation gets its step's recorded result as that."""
        if self._first is None:
            params = list(inspect.signature(self.function).parameters.values())
            if len(params) < 2:
                raise ProjectError(f"step {self.name!r} is used as a compensation, so it must take the "
                                   "result of the step it undoes after its context")
            self._first = TypeAdapter(self._hints().get(params[1].name, Any))
        return self._first

    def dump(self, value: Any) -> Any:
        """The result as JSON-compatible data (what the record keeps)."""
        return self.result.dump_python(value, mode="json")


@overload
def step(function: Callable[Concatenate[Context, P], Awaitable[R]], /) -> Step[P, R]: ...
@overload
def step(*, remote: Literal[True], timeout_s: float = ..., retries: int = ..., backoff_s: float = ...,
         name: str | None = ...) -> Callable[[Callable[Concatenate[RemoteCall, P], Awaitable[R]]], Step[P, R]]: ...
@overload
def step(*, database: str | None = ..., remote: Literal[False] = ..., timeout_s: float = ..., retries: int = ...,
         backoff_s: float = ..., name: str | None = ...,
         ) -> Callable[[Callable[Concatenate[Context, P], Awaitable[R]]], Step[P, R]]: ...


def step(function: Callable[..., Awaitable[Any]] | None = None, /, *, database: str | None = None,
         remote: bool = False, timeout_s: float = DEFAULT_STEP_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
         backoff_s: float = DEFAULT_BACKOFF_S, name: str | None = None) -> Any:
    """Declare a saga step. Local (default): one transaction on ``database`` (default: the project's first),
    as the saga's app. ``remote=True``: an outside call, given a :class:`RemoteCall`.

    ``timeout_s`` bounds one attempt; a transient failure (a timeout, a lost connection, a serialization
    failure or deadlock, an HTTP 5xx/429 or transport error) is tried again up to ``retries`` more times, after
    ``backoff_s`` doubling each time. Anything else (a ``LogicError``, a refused write) fails the step at once."""

    def mark(fn: Callable[..., Awaitable[Any]]) -> Step[Any, Any]:
        return Step(fn, database=database, remote=remote, timeout_s=timeout_s, retries=retries,
                    backoff_s=backoff_s, name=name)

    return mark(function) if function is not None else mark


class SagaDefinition(Generic[In, Out]):
    """A saga function with its options; started by name (``SagaEngine.start``)."""

    def __init__(self, function: Callable[[Saga, In], Awaitable[Out]], *, timeout_s: float | None,
                 name: str | None) -> None:
        if not inspect.iscoroutinefunction(function):
            raise TypeError(f"@gatehouse.saga needs an async function; {function.__qualname__} is not")
        params = list(inspect.signature(function).parameters.values())
        if len(params) != 2 or any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params):
            raise TypeError(f"{function.__qualname__}: a saga takes the saga handle and one input, "
                            "e.g. (s: Saga, order: NewOrder); group several values in a model")
        if timeout_s is not None and timeout_s <= 0:
            raise TypeError(f"{function.__qualname__}: timeout_s must be > 0")
        self.function = function
        self.name = name or function.__name__
        self.timeout_s = timeout_s
        self.module = function.__module__
        self._input_name = params[1].name
        self._adapters: tuple[TypeAdapter[Any], TypeAdapter[Any]] | None = None

    def __repr__(self) -> str:
        return f"<saga {self.name}>"

    def _load(self) -> tuple[TypeAdapter[Any], TypeAdapter[Any]]:
        if self._adapters is None:
            try:
                hints = get_type_hints(self.function)
            except NameError as exc:
                raise ProjectError(f"saga {self.name!r}: an annotation does not resolve ({exc})") from None
            self._adapters = (TypeAdapter(hints.get(self._input_name, Any)), TypeAdapter(hints.get("return", Any)))
        return self._adapters

    @property
    def input(self) -> TypeAdapter[Any]:
        return self._load()[0]

    @property
    def result(self) -> TypeAdapter[Any]:
        return self._load()[1]


@overload
def saga(function: Callable[[Saga, In], Awaitable[Out]], /) -> SagaDefinition[In, Out]: ...
@overload
def saga(*, timeout_s: float | None = ..., name: str | None = ...,
         ) -> Callable[[Callable[[Saga, In], Awaitable[Out]]], SagaDefinition[In, Out]]: ...


def saga(function: Callable[[Saga, Any], Awaitable[Any]] | None = None, /, *, timeout_s: float | None = None,
         name: str | None = None) -> Any:
    """Declare a saga: ``async def place_order(s: Saga, order: NewOrder) -> Placed``. Past ``timeout_s`` (from
    its start) a saga that has not completed is compensated."""

    def mark(fn: Callable[[Saga, Any], Awaitable[Any]]) -> SagaDefinition[Any, Any]:
        return SagaDefinition(fn, timeout_s=timeout_s, name=name)

    return mark(function) if function is not None else mark


@dataclass(frozen=True)
class SagaCatalog:
    """The sagas and steps a project's ``logic/`` declares, by name."""

    sagas: dict[str, SagaDefinition[Any, Any]] = field(default_factory=dict)
    steps: dict[str, Step[Any, Any]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.sagas)

    def databases(self, home: str) -> set[str]:
        """The databases that hold saga records: the home one (saga state, remote steps) and each local step's."""
        if not self.sagas:
            return set()
        return {home} | {s.database or home for s in self.steps.values() if not s.remote}

    def database_of(self, step: Step[Any, Any], home: str) -> str:
        """Where ``step``'s record lives: its database for a local step, the home database for a remote one."""
        return home if step.remote else step.database or home


def collect_sagas(modules: Iterable[tuple[str, ModuleType]], databases: Iterable[str]) -> SagaCatalog:
    """The steps and sagas defined (not merely imported) in the loaded ``logic/`` modules."""
    declared = set(databases)
    catalog = SagaCatalog()
    for where, module in modules:
        for value in vars(module).values():
            if isinstance(value, Step) and value.module == module.__name__:
                if value.name in catalog.steps:
                    raise ProjectError(f"two saga steps are named {value.name!r}", where=where,
                                       hint="a step's name is kept in its records: give each its own")
                if value.database is not None and value.database not in declared:
                    raise ProjectError(f"step {value.name!r} names database {value.database!r}, which "
                                       "gatehouse.toml does not declare", where=where,
                                       hint=f"declared databases: {', '.join(sorted(declared))}")
                catalog.steps[value.name] = value
            elif isinstance(value, SagaDefinition) and value.module == module.__name__:
                if value.name in catalog.sagas:
                    raise ProjectError(f"two sagas are named {value.name!r}", where=where)
                catalog.sagas[value.name] = value
    return catalog
