"""The handle a saga function gets, and replay: how a run finds its place again.

Every run of a saga (its first, a retry, a resume after a crash on any instance) calls the saga function from
the start. Each ``await s.step(...)`` takes the next number n; when step n is recorded as done, its recorded
result is returned without running it, so the function walks quickly through what is done and continues with
the first step that is not. Hence the one rule for saga functions: **call the steps in a deterministic order**
(decide only on the input and on earlier steps' results, never on the clock, randomness or a fresh read outside
a step). A recorded step n whose name differs from the one called now stops the saga as failed (needs
attention) with a message naming both, instead of guessing.

Compensation is chosen at the call::

    hold = await s.step(reserve_stock, order.items).compensate_with(release_stock)

(``s.step(fn, *args, compensate=...)`` cannot be typed: PEP 612 allows no keyword parameter beside a
ParamSpec's ``*args``/``**kwargs``, and mypy refuses it, so the call's arguments would go unchecked.) The
compensation's name is recorded with the step, since a saga being compensated is not replayed.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, ParamSpec, TypeVar

from gatehouse.errors import SagaMisuse, SagaNonDeterministic
from gatehouse.sagas.declare import Step
from gatehouse.sagas.faults import describe, is_transient
from gatehouse.sagas.steps import Failed, RunEnv, Stop, run_step
from gatehouse.sagas.store import StepRecord

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Done:
    """A forward step done in this run or before, in order: what compensation would undo."""

    n: int
    name: str
    data: Any
    compensation: str | None


class StepCall(Generic[R]):
    """``s.step(...)``: await it to run (or replay) the step; ``.compensate_with(undo)`` first to name the step
    that undoes it (it gets this step's result)."""

    __slots__ = ("_args", "_kwargs", "_replay", "_undo", "awaited", "step")

    def __init__(self, replay: Replay, step: Step[Any, R], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._replay, self.step, self._args, self._kwargs = replay, step, args, kwargs
        self._undo: Step[Any, Any] | None = None
        self.awaited = False

    def compensate_with(self, undo: Step[[R], Any]) -> StepCall[R]:
        if self.awaited:
            raise Stop(SagaMisuse(f"compensate_with({undo.name}) came after step {self.step.name} was awaited"))
        self._undo = undo
        return self

    def __await__(self) -> Generator[Any, None, R]:
        self.awaited = True
        result: R = yield from self._replay.call(self.step, self._args, self._kwargs, self._undo).__await__()
        return result


class Saga:
    """What a saga function gets as its first parameter."""

    def __init__(self, replay: Replay) -> None:
        self._replay = replay

    @property
    def id(self) -> str:
        return self._replay.env.run.id

    @property
    def name(self) -> str:
        return self._replay.env.run.name

    @property
    def app(self) -> str:
        return self._replay.env.app.name

    def step(self, step: Step[P, R], /, *args: P.args, **kwargs: P.kwargs) -> StepCall[R]:
        """The next step: ``await s.step(reserve_stock, order.items)`` returns what ``reserve_stock`` returns."""
        self._replay.check_awaited()
        call = StepCall(self._replay, step, tuple(args), dict(kwargs))
        self._replay.pending = call
        return call


class Replay:
    """One run's walk through the saga function: numbering, recorded results, and running what is not done."""

    def __init__(self, env: RunEnv, records: Mapping[tuple[int, str], StepRecord]) -> None:
        self.env = env
        self.records = records
        self.next_n = 1
        self.done: list[Done] = []
        self.pending: StepCall[Any] | None = None
        self._busy = False

    def check_awaited(self) -> None:
        """A step call never awaited would shift every later step's number on the next run: refused."""
        if self.pending is not None and not self.pending.awaited:
            raise Stop(SagaMisuse(f"the saga called step {self.pending.step.name} without awaiting it; "
                                  "write `await s.step(...)`"))

    def check_deadline(self) -> None:
        deadline = self.env.run.deadline
        if deadline is not None and datetime.now(UTC) >= deadline:
            raise Failed("the saga ran past its timeout", n=self.next_n)

    async def call(self, step: Step[Any, R], args: tuple[Any, ...], kwargs: dict[str, Any],
                   undo: Step[Any, Any] | None) -> R:
        if self._busy:
            raise Stop(SagaMisuse("a saga runs one step at a time; await each step before the next"))
        self._busy = True
        try:
            data = await self._call(step, args, kwargs, undo)
        finally:
            self._busy = False
        value: R = step.result.validate_python(data)  # a first run sees what a replay would: the recorded form
        return value

    async def _call(self, step: Step[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                    undo: Step[Any, Any] | None) -> Any:
        n = self.next_n
        self.next_n += 1
        recorded = self.records.get((n, "forward"))
        if recorded is not None:
            if recorded.name != step.name:
                raise Stop(SagaNonDeterministic(
                    f"step {n} was recorded as {recorded.name!r} but the saga now calls {step.name!r} there: "
                    "a saga must call its steps in the same order on every run (fix the code, then retry it)"))
            self.done.append(Done(n, step.name, recorded.result, recorded.compensation))
            return recorded.result
        steps = self.env.runtime.project.sagas.steps
        for declared in (step, undo):
            if declared is not None and declared.name not in steps:
                raise Stop(SagaMisuse(f"{declared.name!r} is not a step declared in logic/ "
                                      "(decorate it with @gatehouse.step at module level)"))
        self.check_deadline()
        self.env.hook("before_step", self.env.run.id, n)
        self.env.check_lease()
        attempt = self.env.attempt(n)
        try:
            data = await run_step(self.env, step, n, "forward", args, kwargs, undo.name if undo else None)
        except Exception as exc:
            raise Failed(f"step {n} ({step.name}) failed: {describe(exc)}", transient=is_transient(exc), n=n,
                         attempt=attempt, retries=step.retries, backoff_s=step.backoff_s) from exc
        self.env.hook("after_commit" if not step.remote else "after_record", self.env.run.id, n)
        self.done.append(Done(n, step.name, data, undo.name if undo else None))
        return data
