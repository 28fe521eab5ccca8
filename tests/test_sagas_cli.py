"""Operating sagas: ``gatehouse sagas list|show|retry|cancel`` (the real CLI, in-process, on real PostgreSQL) and
the saga series of ``/metrics``. The project, its logic and the payment service are tests/test_sagas.py's; every
retry and cancel is checked in ``gatehouse.sagas`` and then driven to its end and checked in every database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

import test_sagas
from gatehouse import cli, operations
from gatehouse.observe.saga_metrics import SagaCollector
from gatehouse.project import Project
from gatehouse.testing import LogicHarness
from test_sagas import Crash, Payments, assert_compensated, effects, new_order

payments, project, harness = test_sagas.payments, test_sagas.project, test_sagas.harness  # (its fixtures)

Gatehouse = Callable[..., Any]


@pytest.fixture
def gatehouse(project: Project, monkeypatch: pytest.MonkeyPatch) -> Gatehouse:
    """``await gatehouse("sagas", "list")``: the CLI in a thread (it runs its own event loop), as a user runs it."""
    monkeypatch.delenv("GATEHOUSE_PROJECT", raising=False)
    runner = CliRunner()

    async def invoke(*args: str) -> Any:
        return await asyncio.to_thread(runner.invoke, cli.app, ["--project", str(project.root), *args])

    return invoke


async def saga_row(project: Project, saga_id: str) -> dict[str, Any]:
    async with operations.owner_connection(project, project.home_database) as conn:
        row = await conn.fetchrow("SELECT state, error, failed_in, next_run_at <= now() AS due FROM gatehouse.sagas "
                                  "WHERE id = $1::uuid", saga_id)
    assert row is not None
    return dict(row)


async def crashed_after_charge(harness: LogicHarness, order: dict[str, object]) -> str:
    """A run left running by a dead instance after its step 2 was recorded (its lease already expired)."""
    def crash(where: str, saga_id: str, n: int) -> None:
        if where == "after_record" and n == 2:
            raise Crash(where)

    dying = harness.saga_engine(lease_s=0.2, hook=crash)
    run = await dying.start("shop", "place_order", order)
    with pytest.raises(Crash):
        await harness.settle_saga(run.id, engine=dying)
    return run.id


async def test_list_and_show_every_run_with_its_steps(harness: LogicHarness, project: Project, payments: Payments,
                                                      gatehouse: Gatehouse) -> None:
    done = await harness.run_saga("place_order", app="shop", data=await new_order(project))
    undone = await harness.run_saga("place_order", app="shop", data=await new_order(project, customer="refused"))
    assert (done.state, undone.state) == ("completed", "compensated")

    listed = await gatehouse("sagas", "list", "--format", "json")
    assert listed.exit_code == 0, listed.output
    runs = {r["id"]: r for r in json.loads(listed.stdout)}
    assert [r["id"] for r in json.loads(listed.stdout)] == [undone.id, done.id]  # newest first
    assert (runs[done.id]["state"], runs[done.id]["steps_done"], runs[done.id]["steps_undone"]) == ("completed", 3, 0)
    assert (runs[undone.id]["state"], runs[undone.id]["steps_done"], runs[undone.id]["steps_undone"]) == (
        "compensated", 2, 2)
    assert runs[undone.id]["error"] == "step 3 (create_order) failed: this customer may not order"

    table = await gatehouse("sagas", "list", "--state", "compensated")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "SAGA", "APP", "STATE", "STEP", "ATTEMPTS", "AGE", "LAST", "ERROR"]
    assert len(lines) == 2 and lines[1].startswith(undone.id) and "compensated  2 -2" in lines[1]
    assert re.search(r"  \d+s +step 3 \(create_order\) failed: this customer may not order$", lines[1])  # age
    assert (await gatehouse("sagas", "list", "--name", "wobbly")).stdout.strip() == "no saga runs match"
    assert len(json.loads((await gatehouse("sagas", "list", "--limit", "1", "--format", "json")).stdout)) == 1

    shown = await gatehouse("sagas", "show", undone.id)
    assert shown.exit_code == 0, shown.output
    text = shown.stdout
    assert f"saga run {undone.id}: place_order (app shop)" in text and "state        compensated" in text
    order = [line.split(":")[0].strip() for line in text.splitlines() if line.startswith(("    step", "    undo"))]
    assert order == ["step 1 reserve_stock", "step 2 charge_card", "undo 2 refund", "undo 1 release_stock"]
    assert "done at" in text and "in catalog, attempt 1, undone by release_stock" in text
    assert '"id": "ch_' in text  # the charge's recorded result

    as_json = json.loads((await gatehouse("sagas", "show", done.id, "--format", "json")).stdout)
    assert as_json["state"] == "completed" and as_json["result"] == done.result
    assert [(s["n"], s["kind"], s["database"]) for s in as_json["steps"]] == [
        (1, "forward", "catalog"), (2, "forward", "orders"), (3, "forward", "orders")]


async def test_unknown_ids_and_bad_options_are_one_clear_line(harness: LogicHarness, project: Project,
                                                              gatehouse: Gatehouse) -> None:
    unknown = str(uuid.uuid4())
    for args in (("show", unknown), ("show", "not-an-id"), ("retry", unknown), ("cancel", "x")):
        answer = await gatehouse("sagas", *args)
        assert answer.exit_code == 1, args
        assert f"no saga run {args[1]!r} in the home database (orders)" in answer.output
        assert "hint: the ids are in `gatehouse sagas list`" in answer.output
        assert "Traceback" not in answer.output and isinstance(answer.exception, SystemExit)
    bad_state = await gatehouse("sagas", "list", "--state", "done")
    assert bad_state.exit_code == 1 and "--state 'done' is not a saga state" in bad_state.output
    assert (await gatehouse("sagas", "show", unknown, "--format", "yaml")).exit_code == 1

    done = await harness.run_saga("place_order", app="shop", data=await new_order(project))
    retried = await gatehouse("sagas", "retry", done.id)
    assert retried.exit_code == 1 and f"saga run {done.id} is completed, not failed: there is nothing to retry" \
        in retried.output
    cancelled = await gatehouse("sagas", "cancel", done.id)
    assert cancelled.exit_code == 1 and "only a running saga can be cancelled" in cancelled.output
    assert (await saga_row(project, done.id))["state"] == "completed"  # neither touched it


async def test_cancel_marks_a_running_saga_compensating_and_it_is_undone(
        harness: LogicHarness, project: Project, payments: Payments, gatehouse: Gatehouse) -> None:
    order = await new_order(project)
    saga_id = await crashed_after_charge(harness, order)
    listed = json.loads((await gatehouse("sagas", "list", "--state", "running", "--format", "json")).stdout)
    assert [(r["id"], r["steps_done"]) for r in listed] == [(saga_id, 2)]

    answer = await gatehouse("sagas", "cancel", saga_id)
    assert answer.exit_code == 0, answer.output
    assert f"saga run {saga_id} (place_order): cancelled, compensating" in answer.stdout
    assert await saga_row(project, saga_id) == {"state": "compensating", "error": "cancelled", "failed_in": None,
                                                "due": True}
    again = await gatehouse("sagas", "cancel", saga_id)
    assert again.exit_code == 0 and "already being compensated: nothing to do" in again.stdout

    final = await harness.settle_saga(saga_id)
    assert (final.state, final.error) == ("compensated", "cancelled")
    assert_compensated(await effects(project, payments, saga_id, order))


async def test_retry_goes_on_with_a_failed_saga_once_its_code_is_fixed(
        harness: LogicHarness, project: Project, payments: Payments, gatehouse: Gatehouse,
        monkeypatch: pytest.MonkeyPatch) -> None:
    order = await new_order(project)

    def crash(where: str, saga_id: str, n: int) -> None:
        if where == "after_commit":
            raise Crash(where)

    dying = harness.saga_engine(lease_s=0.2, hook=crash)
    run = await dying.start("shop", "wobbly", order)
    with pytest.raises(Crash):
        await harness.settle_saga(run.id, engine=dying)
    monkeypatch.setenv("SAGA_TEST_WOBBLE", "1")
    failed = await harness.settle_saga(run.id, engine=harness.saga_engine())
    assert failed.state == "failed"

    listed = await gatehouse("sagas", "list", "--state", "failed")
    assert run.id in listed.stdout and "step 1 was recorded as 'reserve_stock' but the saga now cal…\n" in listed.stdout
    shown = await gatehouse("sagas", "show", run.id)
    assert "state        failed (failed while running)" in shown.stdout
    collector = SagaCollector(harness.sagas.stats, harness.runtime.internal_pool(project.home_database))

    async def failed_gauge() -> dict[str, float]:
        await collector.refresh()
        return {s.labels["saga"]: s.value for m in collector.collect() if m.name == "gatehouse_sagas_failed"
                for s in m.samples}
    assert await failed_gauge() == {"wobbly": 1}  # what the saga_failed alert rule watches

    monkeypatch.delenv("SAGA_TEST_WOBBLE")  # the code is fixed
    answer = await gatehouse("sagas", "retry", run.id)
    assert answer.exit_code == 0, answer.output
    assert f"saga run {run.id} (wobbly): running again, forward from its last recorded step" in answer.stdout
    row = await saga_row(project, run.id)
    assert (row["state"], row["failed_in"], row["due"]) == ("running", None, True)
    fixed = await harness.settle_saga(run.id)
    assert fixed.state == "completed" and await failed_gauge() == {}
    async with operations.owner_connection(project, "catalog") as conn:
        holds = await conn.fetch("SELECT id, released FROM holds WHERE sku = $1", order["sku"])
    assert [(h["id"], h["released"]) for h in holds] == [(fixed.result, False)]  # reserved once, kept


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_count_runs_steps_and_outcomes(harness: LogicHarness, project: Project,
                                                     payments: Payments) -> None:
    flaky = await new_order(project, customer="flaky")
    payments.flaky.add(str(flaky["customer"]))
    for order in (await new_order(project), flaky, await new_order(project, customer="refused")):
        await harness.run_saga("place_order", app="shop", data=order)
    await harness.sagas.start("shop", "place_order", await new_order(project))  # left running

    seen = _samples(harness.runtime.metrics.render().decode())

    def value(name: str, **labels: str) -> float:
        return seen.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("gatehouse_sagas_started_total", saga="place_order") == 4
    assert value("gatehouse_sagas_finished_total", saga="place_order", state="completed") == 2
    assert value("gatehouse_sagas_finished_total", saga="place_order", state="compensated") == 1
    assert value("gatehouse_sagas_finished_total", saga="place_order", state="failed") == 0
    steps = {(dict(labels)["step"], dict(labels)["outcome"]): count for (name, labels), count in seen.items()
             if name == "gatehouse_saga_steps_total"}
    assert steps == {("reserve_stock", "done"): 3, ("charge_card", "done"): 3, ("charge_card", "retried"): 1,
                     ("create_order", "done"): 2, ("create_order", "failed"): 1,
                     ("refund", "compensated"): 1, ("release_stock", "compensated"): 1}
    assert value("gatehouse_saga_step_duration_seconds_count", saga="place_order", step="charge_card") == 4
    assert value("gatehouse_saga_step_duration_seconds_bucket", saga="place_order", step="charge_card",
                 le="+Inf") == 4
    assert 0 < value("gatehouse_saga_step_duration_seconds_sum", saga="place_order", step="reserve_stock") < 10

    collector = SagaCollector(harness.sagas.stats, harness.runtime.internal_pool(project.home_database))
    await collector.refresh()  # what a scrape reads a moment later, read now
    active = {tuple(s.labels.values()): s.value for m in collector.collect() if m.name == "gatehouse_sagas_active"
              for s in m.samples}
    assert active == {("running",): 1, ("compensating",): 0}
    async with asyncio.timeout(5):  # the server's own collector reads it behind a scrape
        while value("gatehouse_sagas_active", state="running") != 1:
            await asyncio.sleep(0.05)
            with contextlib.suppress(KeyError):
                seen = _samples(harness.runtime.metrics.render().decode())
