"""``gatehouse sagas``: look at saga runs and unstick them, without a server (docs/sagas.md, "Operating sagas").

``list`` and ``show`` read ``gatehouse.sagas`` (home database) and ``gatehouse.saga_steps`` (each saga database);
``retry`` and ``cancel`` go through the engine's own ``retry``/``cancel`` on gatehouse's connections
(:mod:`gatehouse.sagas.admin`), so they obey the same rules as the HTTP API. They mark a run due; a serving
instance's runner takes it up within a second. Every command opens one connection per saga database and runs a
handful of statements: no progress to show.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from gatehouse.cli.common import fail, out, project_here, run
from gatehouse.errors import SagaNotFound
from gatehouse.sagas.admin import STATES, RunSummary, StepDetail, list_runs, operator_engine, step_details
from gatehouse.sagas.store import SagaRun

if TYPE_CHECKING:
    from gatehouse.sagas.engine import SagaEngine

T = TypeVar("T")
sagas_app = typer.Typer(help="Saga runs: list, show, retry (a failed one), cancel (a running one).",
                        no_args_is_help=True)
SagaId = Annotated[str, typer.Argument(metavar="ID", help="The run's id (from `gatehouse sagas list`).")]
Format = Annotated[str, typer.Option("--format", help="table or json.")]


def _with_engine(action: Callable[[SagaEngine], Awaitable[T]], saga_id: str | None = None) -> T:
    """Run ``action`` on an operator's engine; an unknown ``saga_id`` is one line naming it, and exit 1."""
    project = project_here()

    async def go() -> T:
        async with operator_engine(project) as engine:
            return await action(engine)

    try:
        return run(go())
    except SagaNotFound:
        raise fail(f"no saga run {saga_id!r} in the home database ({project.home_database})",
                   hint="the ids are in `gatehouse sagas list` (add --state failed for those that need attention)") \
            from None


def _check_format(output: str) -> None:
    if output not in ("table", "json"):
        raise fail(f"--format is table or json, not {output!r}")


def _age(moment: datetime, now: datetime) -> str:
    seconds = max(0.0, (now - moment).total_seconds())
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h" if seconds < 86400 else f"{seconds / 86400:.1f}d"


def _short(text: str | None, width: int = 60) -> str:
    if not text:
        return ""
    line = text.splitlines()[0]
    return line if len(line) <= width else line[: width - 1] + "…"


def _json(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)


def _summary_json(run_: RunSummary) -> dict[str, Any]:
    return {"id": run_.id, "name": run_.name, "app": run_.app, "state": run_.state, "steps_done": run_.steps_done,
            "steps_undone": run_.steps_undone, "attempts": run_.attempts, "failing_step": run_.failing_step,
            "error": run_.error, "created_at": run_.created_at.isoformat(), "updated_at": run_.updated_at.isoformat()}


@sagas_app.command("list")
def sagas_list(
    state: Annotated[str | None, typer.Option(help=f"Only runs in this state: {', '.join(STATES)} "
                                                   "(failed: those that need attention).")] = None,
    name: Annotated[str | None, typer.Option(help="Only runs of this saga.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many runs, the newest first.")] = 50,
    output: Format = "table",
) -> None:
    """The newest saga runs: id, saga, app, state, steps done (-undone), attempts, age, last error."""
    _check_format(output)
    if state is not None and state not in STATES:
        raise fail(f"--state {state!r} is not a saga state", hint=f"one of {', '.join(STATES)}")
    runs = _with_engine(lambda engine: list_runs(engine, state=state, name=name, limit=limit))
    if output == "json":
        print(json.dumps([_summary_json(r) for r in runs], indent=2))
        return
    if not runs:
        out.print("no saga runs" + (" match" if state or name else " yet"))
        return
    now = datetime.now(UTC)
    rows = [("ID", "SAGA", "APP", "STATE", "STEP", "ATTEMPTS", "AGE", "LAST ERROR")]
    for r in runs:
        step = str(r.steps_done) + (f" -{r.steps_undone}" if r.steps_undone else "")
        attempts = f"{r.attempts} (step {r.failing_step})" if r.failing_step is not None else ""
        rows.append((r.id, r.name, r.app, r.state, step, attempts, _age(r.created_at, now), _short(r.error)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
        out.print(line.rstrip(), highlight=False, markup=False)


def _run_lines(saga: SagaRun, now: datetime) -> list[str]:
    lines = [f"saga run {saga.id}: {saga.name} (app {saga.app})",
             f"  state        {saga.state}" + (f" (failed while {saga.failed_in})" if saga.failed_in else ""),
             f"  started      {saga.created_at:%Y-%m-%d %H:%M:%S %Z} ({_age(saga.created_at, now)} ago), "
             f"last change {saga.updated_at:%H:%M:%S}"]
    if saga.subject is not None:
        lines.append(f"  user         {saga.subject} (its steps run with this user's claims)")
    if saga.idempotency_key:
        lines.append(f"  key          {saga.idempotency_key}")
    if saga.failing_step is not None:
        lines.append(f"  attempts     {saga.attempts} at step {saga.failing_step}; next at {saga.next_run_at:%H:%M:%S}")
    if saga.deadline is not None:
        lines.append(f"  deadline     {saga.deadline:%Y-%m-%d %H:%M:%S %Z}")
    if saga.lease_owner and saga.lease_until and saga.lease_until > now:
        lines.append(f"  runner       {saga.lease_owner} (lease until {saga.lease_until:%H:%M:%S})")
    if saga.error:
        lines.append(f"  error        {saga.error}")
    lines.append(f"  input        {_json(saga.input)}")
    if saga.result is not None:
        lines.append(f"  result       {_json(saga.result)}")
    return lines


def _step_lines(steps: list[StepDetail]) -> list[str]:
    if not steps:
        return ["  steps        none recorded"]
    lines = ["  steps"]
    for step in steps:
        what = "step" if step.kind == "forward" else "undo"
        undo = f", undone by {step.compensation}" if step.compensation and step.kind == "forward" else ""
        lines.append(f"    {what} {step.n} {step.name}: {step.status} at {step.finished_at:%H:%M:%S} in "
                     f"{step.database}, attempt {step.attempts}{undo}")
        if step.result is not None:
            lines.append(f"      result {_short(_json(step.result), 200)}")
        if step.error:
            lines.append(f"      error  {step.error}")
    return lines


@sagas_app.command("show")
def sagas_show(saga_id: SagaId, output: Format = "table") -> None:
    """One run: its state, input, result or error, and every step and compensation recorded, with results."""
    _check_format(output)

    async def read(engine: SagaEngine) -> tuple[SagaRun, list[StepDetail]]:
        saga = await engine.get(saga_id)
        return saga, await step_details(engine, saga.id)

    saga, steps = _with_engine(read, saga_id)
    if output == "json":
        fields = {name: getattr(saga, name) for name in saga.__dataclass_fields__ if name != "request_hash"}
        fields["steps"] = [{name: getattr(s, name) for name in s.__dataclass_fields__} for s in steps]
        print(json.dumps(fields, indent=2, default=str, ensure_ascii=False))
        return
    for line in _run_lines(saga, datetime.now(UTC)) + _step_lines(steps):
        out.print(line, highlight=False, markup=False)


@sagas_app.command("retry")
def sagas_retry(saga_id: SagaId) -> None:
    """Go on with a failed run (needs attention) from where it stopped.

    Forward again if it failed running (its code fixed), compensating again if a compensation failed."""

    async def act(engine: SagaEngine) -> tuple[SagaRun, SagaRun]:
        before = await engine.get(saga_id)
        return before, await engine.retry(saga_id)

    before, after = _with_engine(act, saga_id)
    if before.state != "failed" or after.state == "failed":
        raise fail(f"saga run {saga_id} is {after.state}, not failed: there is nothing to retry",
                   hint="retry is for runs that failed and need attention (`gatehouse sagas list --state failed`); "
                        "a running one is retried by itself, and `gatehouse sagas cancel` undoes it")
    way = "forward from its last recorded step" if after.state == "running" else "compensating where it stopped"
    out.print(f"saga run {saga_id} ({after.name}): {after.state} again, {way}; a running `gatehouse serve` takes "
              "it up at once", highlight=False, markup=False)


@sagas_app.command("cancel")
def sagas_cancel(saga_id: SagaId) -> None:
    """Undo a running saga: its recorded steps' compensations run, newest first.

    Its error then reads "cancelled". A finished run is left as it is."""

    async def act(engine: SagaEngine) -> tuple[SagaRun, SagaRun]:
        before = await engine.get(saga_id)
        return before, await engine.cancel(saga_id)

    before, after = _with_engine(act, saga_id)
    if before.state == "compensating" or (before.state != "running" and after.state == "compensating"):
        out.print(f"saga run {saga_id} ({after.name}) is already being compensated: nothing to do",
                  highlight=False, markup=False)
        return
    if after.state != "compensating":
        hint = ("`gatehouse sagas retry` goes on with a failed one" if after.state == "failed" else
                "to undo a finished saga's effects, start a saga (or call a function) that reverses them")
        raise fail(f"saga run {saga_id} is {after.state}: only a running saga can be cancelled", hint=hint)
    out.print(f"saga run {saga_id} ({after.name}): cancelled, compensating; a running `gatehouse serve` undoes its "
              "steps at once", highlight=False, markup=False)
