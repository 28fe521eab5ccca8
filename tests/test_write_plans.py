"""Plain inserts planned once per request shape (``gatehouse.write_plans``): a later insert of the shape runs the
same statement as a fully planned one would, with its own rows and its own audit record, and anything that does
not fit the shape is planned in full."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator

import orjson
import pytest

from conftest import ProjectFactory, prepare
from gatehouse import operations, writing
from gatehouse.auth.identity import Identity
from gatehouse.http.exchange import HttpRequest
from gatehouse.observe.audit import AUDIT_CTE_PARAMS
from gatehouse.project import Project
from gatehouse.query.sql import CompiledQuery
from gatehouse.runtime import Runtime
from gatehouse.write_plans import WritePlan
from test_writes import CONTRACTS, MIGRATION, TOML

numbers = itertools.count(1)


@pytest.fixture
async def runtime(make_project: ProjectFactory) -> AsyncIterator[Runtime]:
    project = make_project(toml=TOML, migrations={"V001__items.sql": MIGRATION}, contracts=CONTRACTS)
    await prepare(project)
    started = Runtime(project)
    await started.start()
    yield started
    await started.stop()


def request(body: object, *, prefer: str | None = None, query: str = "") -> HttpRequest:
    payload = orjson.dumps(body)

    async def chunks():  # type: ignore[no-untyped-def]
        yield payload

    headers = {"content-type": "application/json", "content-length": str(len(payload)),
               "x-request-id": f"plan-{next(numbers)}"}
    if prefer:
        headers["prefer"] = prefer
    made = HttpRequest("POST", "/items", query, headers, client="127.0.0.1", body_chunks=chunks)
    made.labels.request_id, made.labels.app, made.labels.method = headers["x-request-id"], "clerk", "POST"
    return made


def identity(project: Project) -> Identity:
    return Identity(app="clerk", key_id="k1")


@pytest.mark.parametrize(("prefer", "query", "bodies"), [
    (None, "", [{"sku": "s1", "name": "one"}, {"sku": "s2", "name": "two"}]),
    ("return=representation", "select=id,sku", [[{"sku": "r1", "name": "a"}, {"sku": "r2", "name": "b"}],
                                                 [{"sku": "r3", "name": "c"}]]),
    ("return=headers-only", "", [{"name": "x", "sku": "h1", "qty": 2}, {"name": "y", "sku": "h2", "qty": 5}]),
    (None, "", [{"sku": "o1", "name": "a"}, [{"sku": "o2", "name": "b"}, {"name": "c", "sku": "o3"}]]),
], ids=["minimal", "representation", "headers-only", "keys-in-another-order"])
async def test_a_later_insert_of_a_shape_runs_the_statement_planning_it_in_full_gives(
        runtime: Runtime, prefer: str | None, query: str, bodies: list[object]) -> None:
    project, app = runtime.project, runtime.project.apps["clerk"]
    first = await writing.plan_write(request(bodies[0], prefer=prefer, query=query), runtime, identity(project),
                                     app, "items", None)
    assert len(runtime.writes) == 1 and first.statement is not None
    later = request(bodies[1], prefer=prefer, query=query)
    from_template = await writing.plan_write(later, runtime, identity(project), app, "items", None)
    assert runtime.writes.hits == 1
    in_full, _ = await writing._plan_in_full(later, runtime, identity(project), app, "items", None,
                                              await writing._write_body(later, project))
    assert from_template.statement is not None and in_full.statement is not None
    assert from_template.statement.sql == in_full.statement.sql
    template = runtime.writes.get(next(iter(runtime.writes._plans)))
    assert template is not None
    duration = template.audit_slot + 10  # the record's time so far: the two were made a moment apart
    assert [p for i, p in enumerate(from_template.statement.params) if i != duration] == \
        [p for i, p in enumerate(in_full.statement.params) if i != duration]
    assert from_template.statement.params[template.audit_slot + 1] == later.labels.request_id
    assert template.audit_slot + AUDIT_CTE_PARAMS <= len(in_full.statement.params)


async def test_inserts_of_one_shape_write_their_own_rows_and_records(runtime: Runtime) -> None:
    project, app = runtime.project, runtime.project.apps["clerk"]
    sent = [{"sku": f"k{n}", "name": f"item {n}", "qty": n} for n in range(30)]
    request_ids = []
    for row in sent:
        made = request(row)
        request_ids.append(made.labels.request_id)
        plan = await writing.plan_write(made, runtime, identity(project), app, "items", None)
        await writing.execute_write(runtime, app, plan, made.labels)
    assert runtime.writes.hits == 29
    async with operations.owner_connection(project) as conn:
        rows = await conn.fetch("SELECT sku, name, qty FROM items WHERE sku LIKE 'k%' ORDER BY qty")
        audited = await conn.fetch("SELECT request_id, status, rows, target FROM gatehouse.audit_log "
                                   "WHERE request_id = ANY($1::text[]) ORDER BY id", request_ids)
    assert [dict(r) for r in rows] == sent
    assert [(r["request_id"], r["status"], r["rows"], r["target"]) for r in audited] == \
        [(rid, 201, 1, "items") for rid in request_ids]


async def test_a_body_that_does_not_fit_the_shape_is_planned_in_full(runtime: Runtime) -> None:
    project, app = runtime.project, runtime.project.apps["clerk"]
    await writing.plan_write(request({"sku": "f1", "name": "a"}), runtime, identity(project), app, "items", None)
    other = await writing.plan_write(request({"sku": "f2", "name": "b", "note": "n"}), runtime, identity(project),
                                     app, "items", None)
    assert other.statement is not None and '"note"' in other.statement.sql
    with pytest.raises(Exception) as refused:  # keys that differ between rows: the full path's own error
        await writing.plan_write(request([{"sku": "f3", "name": "c"}, {"sku": "f4", "qty": 1}]), runtime,
                                 identity(project), app, "items", None)
    assert "All object keys must match" in str(refused.value)
    empty = await writing.plan_write(request([]), runtime, identity(project), app, "items", None)
    assert empty.statement is None


@pytest.mark.parametrize(("prefer", "builds_key"), [(None, False), ("return=representation", False),
                                                    ("return=headers-only", True)])
async def test_only_an_insert_answered_with_its_location_asks_for_the_first_key(runtime: Runtime, prefer: str | None,
                                                                                builds_key: bool) -> None:
    project, app = runtime.project, runtime.project.apps["clerk"]
    made = request([{"sku": "l1", "name": "a"}, {"sku": "l2", "name": "b"}], prefer=prefer)
    plan = await writing.plan_write(made, runtime, identity(project), app, "items", None)
    assert plan.statement is not None and ("json_build_array" in plan.statement.sql) is builds_key
    outcome = await writing.execute_write(runtime, app, plan, made.labels)
    assert outcome is not None and outcome.written == 2 and outcome.xid is not None
    async with operations.owner_connection(project) as conn:
        first = await conn.fetchval("SELECT id FROM items WHERE sku = 'l1'")
    assert outcome.first_key == (f"[{first}]" if builds_key else None)


async def test_a_plan_with_another_statement_keeps_every_other_field(runtime: Runtime) -> None:
    project, app = runtime.project, runtime.project.apps["clerk"]
    plan = await writing.plan_write(request({"sku": "w1", "name": "w"}, prefer="return=representation"), runtime,
                                    identity(project), app, "items", None)
    other = CompiledQuery("SELECT 1", [1])
    copied = plan.with_statement(other)
    for name in (f.name for f in dataclasses.fields(WritePlan)):
        assert getattr(copied, name) is (other if name == "statement" else getattr(plan, name)), name
