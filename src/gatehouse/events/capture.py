"""``apply``: capture the changes of every evented contract, in the database that holds it.

``[events.orders] version = 1`` makes apply create, in the database of ``orders``:

* ``gatehouse.outbox`` (:mod:`gatehouse.events.outbox`) and ``gatehouse.aggregate_versions`` (what is kept of
  events the relay deleted), with SELECT on the outbox for the authenticator (the HTTP feed reads it on
  gatehouse's internal pool);
* row triggers on the key table of ``orders.v1`` and on each other table it reads with a foreign key path to it
  (:mod:`gatehouse.events.capture_plan`), whose functions write each change's event in the changing
  transaction, shaped as ``orders.v1`` shows the row (:mod:`gatehouse.events.capture_sql`).

Every writer is captured: gatehouse's own writes through the contract views, a migration, a cron job, ``psql``.
The capture is re-created when the contract's version (or its definition) changes, and removed when the
contract stops being evented (the outbox and its rows stay). Each change is one line of apply's report.

Placing a trigger takes the table's owner (or its TRIGGER privilege): when apply's login has neither, the table
is reported and skipped, and the rest of apply goes on, as for the cache's data-version triggers. The trigger of
a table other than the key table locks the key rows it changes (so that events of one aggregate are numbered in
commit order), which takes UPDATE on the key table: without it, apply refuses with the grant to make.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import asyncpg

from gatehouse.contracts.model import ContractVersion
from gatehouse.db import quote_ident
from gatehouse.db.catalog import load_constraints
from gatehouse.errors import ProjectError
from gatehouse.events.capture_plan import ROW, CapturePlan, Table, plan_capture, served_view
from gatehouse.events.capture_sql import (
    AGGREGATE_VERSIONS_DDL,
    COMMENT_PREFIX,
    FUNCTION_PREFIX,
    HELPER_RETURNS,
    HELPERS,
    NUMBERS_ABOVE_KEPT,
    RETIRED_HELPERS,
    SCHEMA,
    TRIGGER_PREFIX,
    Function,
    create_trigger,
    plan_functions,
    trigger_name,
)
from gatehouse.events.outbox import ensure_outbox
from gatehouse.project import Project

EXISTING_FUNCTIONS = r"""
SELECT p.oid::regprocedure::text AS signature, p.proname AS name, p.prosrc AS body,
       p.proargtypes::oid[] AS arguments, coalesce(obj_description(p.oid, 'pg_proc'), '') AS comment
FROM pg_proc p
WHERE p.pronamespace = 'gatehouse'::regnamespace AND p.proname LIKE 'ev\_%'
"""
EXISTING_TRIGGERS = r"""
SELECT t.tgname AS trigger, t.tgrelid AS relid, n.nspname AS schema, c.relname AS table, p.proname AS function
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_proc p ON p.oid = t.tgfoid
WHERE t.tgname LIKE 'gatehouse\_event\_%' AND NOT t.tgisinternal
"""


@dataclass(slots=True)
class _Wanted:
    plan: CapturePlan
    functions: list[tuple[Function, Table]] = field(default_factory=list)


def evented_contracts(project: Project) -> list[ContractVersion]:
    """The contract version each ``[events.<name>]`` names, checked (ProjectError with the key and the fix)."""
    chosen: list[ContractVersion] = []
    for name, settings in sorted(project.config.events.items()):
        versions = sorted(c.version for c in project.contracts if c.name == name)
        if not versions:
            known = ", ".join(sorted({c.name for c in project.contracts})) or "none"
            raise ProjectError(f"[events.{name}] names no contract", hint=f"known contracts: {known}")
        contract = next((c for c in project.contracts if c.name == name and c.version == settings.version), None)
        if contract is None:
            raise ProjectError(f"[events.{name}] version = {settings.version}: {name} has no such version",
                               hint=f"its versions: {', '.join(f'v{v}' for v in versions)}")
        chosen.append(contract)
    return chosen


async def _check_shape(conn: asyncpg.Connection, plan: CapturePlan) -> None:
    """The shaped row has exactly the view's columns and types (else the events would not be the contract's)."""
    probe = plan.shape_sql.replace(ROW, f"(SELECT (NULL::{plan.key_table.qualified}).*)", 1)
    statement = await conn.prepare(f"SELECT * FROM ({probe}) AS v LIMIT 0")
    shaped = [(a.name, a.type.oid) for a in statement.get_attributes()]
    shown = [(r["attname"], r["atttypid"]) for r in await conn.fetch(
        "SELECT attname::text, atttypid::int AS atttypid FROM pg_attribute WHERE attrelid = $1::regclass "
        "AND attnum > 0 AND NOT attisdropped ORDER BY attnum", plan.view)]
    if shaped != shown:
        raise ProjectError(f"[events.{plan.contract}]: the rows of {plan.label} cannot be shaped from its key table "
                           f"{plan.key_table.text} alone", hint="events need a contract that reads one row of its "
                                                                "key table per row it shows")


async def _check_lock_privilege(conn: asyncpg.Connection, plan: CapturePlan) -> None:
    """The trigger of another table locks the key rows (``FOR NO KEY UPDATE``), which needs UPDATE on the key
    table (a column of it) for apply's login, who owns the trigger functions."""
    if len(plan.tables) < 2 or await conn.fetchval("SELECT has_any_column_privilege($1::oid, 'UPDATE')",
                                                   plan.key_table.relid):
        return
    login = await conn.fetchval("SELECT current_user")
    others = ", ".join(c.table.text for c in plan.tables[1:])
    raise ProjectError(f"[events.{plan.contract}]: capturing the changes of {others} locks the rows of "
                       f"{plan.key_table.text} they change, and {login} may not update {plan.key_table.text}",
                       hint=f"GRANT UPDATE ON {plan.key_table.qualified} TO {quote_ident(login)}, or run "
                            "`gatehouse apply` as the owner of the tables")


async def _create_helpers(conn: asyncpg.Connection, existing: dict[str, asyncpg.Record]) -> None:
    for signature, body in HELPERS.items():
        name, arguments = signature.split("(", 1)
        found = existing.get(name)
        if found is not None and found["body"] == body:
            continue
        function = Function(name, arguments.rstrip(")"), HELPER_RETURNS[signature], body)
        for statement in function.create(None):
            await conn.execute(statement)


async def _plan_all(conn: asyncpg.Connection, project: Project, contracts: Iterable[ContractVersion]) -> list[_Wanted]:
    constraints = await load_constraints(conn)
    wanted: list[_Wanted] = []
    for contract in contracts:
        view = served_view(contract, project.versions.views())
        if view is None:
            raise ProjectError(f"[events.{contract.name}] version = {contract.version}: {contract.label} is not "
                               "served by any live API version", hint="event a version that is served")
        plan = await plan_capture(conn, contract, view, constraints)
        await _check_shape(conn, plan)
        await _check_lock_privilege(conn, plan)
        entry = _Wanted(plan)
        for function, captured in plan_functions(plan):
            entry.functions.append((function, captured.table))
        wanted.append(entry)
    return wanted


async def sync_event_capture(conn: asyncpg.Connection, project: Project, database: str,
                             authenticator: str) -> list[str]:
    """Make the capture of this database's evented contracts match the project; returns the changes."""
    contracts = [c for c in evented_contracts(project) if c.database == database]
    functions = {r["name"]: r for r in await conn.fetch(EXISTING_FUNCTIONS)} if await _has_schema(conn) else {}
    triggers = list(await conn.fetch(EXISTING_TRIGGERS))
    if not contracts and not triggers and not any(r["comment"].startswith(COMMENT_PREFIX) for r in functions.values()):
        return []
    changes: list[str] = []
    if contracts:
        if await ensure_outbox(conn):  # (not its DDL again: that would wait for every writer of events)
            changes.append("created gatehouse.outbox (change events, read by the relay and the HTTP feed)")
        if await conn.fetchval("SELECT to_regclass('gatehouse.aggregate_versions') IS NULL"):
            await conn.execute(AGGREGATE_VERSIONS_DDL)
        await conn.execute(NUMBERS_ABOVE_KEPT)
        await conn.execute(f"GRANT SELECT ON gatehouse.outbox TO {quote_ident(authenticator)}")
        await _create_helpers(conn, functions)
    wanted = await _plan_all(conn, project, contracts)
    previous = {r["comment"].removeprefix(COMMENT_PREFIX).rsplit(".v", 1)[0]: r["comment"].removeprefix(COMMENT_PREFIX)
                for r in functions.values() if r["comment"].startswith(COMMENT_PREFIX)}
    touched = await _sync_functions(conn, wanted, functions)
    for retired in RETIRED_HELPERS if contracts else ():  # (after: the functions that called them are replaced)
        await conn.execute(f"DROP FUNCTION IF EXISTS {SCHEMA}.{retired}")
    stopped, kept = await _drop_unwanted(conn, wanted, functions, triggers)
    touched |= set(stopped)
    added = await _add_triggers(conn, wanted, kept, changes)
    for entry in wanted:
        plan = entry.plan
        if plan.contract in touched or plan.contract in added:
            changes.extend(_reported(plan, previous.get(plan.contract), plan.contract in touched,
                                     added.get(plan.contract, [])))
    names = {entry.plan.contract for entry in wanted}
    for contract, tables in sorted(stopped.items()):
        if contract not in names:
            changes.append(f"events of {contract}: stopped capturing the changes of {', '.join(sorted(tables))} "
                           f"(no [events.{contract}] in this database any more; the outbox keeps its events)")
    return changes


def _reported(plan: CapturePlan, was: str | None, rebuilt: bool, added: list[str]) -> list[str]:
    tables = ", ".join(t.table.text for t in plan.tables)
    if was is None:
        line = f"events of {plan.label}: capturing the changes of {tables}"
    elif was != plan.label:
        line = f"events of {plan.contract}: now shaped as {plan.label} (was {was}); capturing the changes of {tables}"
    elif rebuilt:
        line = f"events of {plan.label}: re-created the capture of {tables}"
    else:
        line = f"events of {plan.label}: capturing the changes of {', '.join(added)}"
    notes = [f"events of {plan.label}: {note}" for note in plan.uncaptured] if was != plan.label else []
    return [line, *notes]


def _desired(wanted: list[_Wanted]) -> tuple[dict[str, tuple[Function, str]],
                                             dict[tuple[str, int], tuple[str, Table, Function]]]:
    """Function name → (function, contract label); (trigger, table) → (contract, table, function)."""
    functions: dict[str, tuple[Function, str]] = {}
    triggers: dict[tuple[str, int], tuple[str, Table, Function]] = {}
    for entry in wanted:
        for function, table in entry.functions:
            functions[function.name] = (function, entry.plan.label)
            triggers[(trigger_name(entry.plan.contract), table.relid)] = (entry.plan.contract, table, function)
    return functions, triggers


async def _sync_functions(conn: asyncpg.Connection, wanted: list[_Wanted],
                          existing: dict[str, asyncpg.Record]) -> set[str]:
    """Create or replace the functions that differ; returns the contracts whose functions changed."""
    touched: set[str] = set()
    for name, (function, label) in sorted(_desired(wanted)[0].items()):
        found = existing.get(name)
        arguments = await _argument_types(conn, function)
        if found is not None and found["body"] == function.body and list(found["arguments"]) == arguments \
                and found["comment"] == COMMENT_PREFIX + label:
            continue
        if found is not None and list(found["arguments"]) != arguments:  # (a new key table: a new signature)
            await conn.execute(f"DROP FUNCTION {_qualified_signature(found['signature'])}")
        for statement in function.create(COMMENT_PREFIX + label):
            await conn.execute(statement)
        touched.add(label.rsplit(".v", 1)[0])
    return touched


async def _drop_unwanted(conn: asyncpg.Connection, wanted: list[_Wanted], functions: dict[str, asyncpg.Record],
                         triggers: list[asyncpg.Record]) -> tuple[dict[str, list[str]], set[tuple[str, int]]]:
    """Drop the triggers and functions no evented contract needs; returns the tables whose trigger went, per
    contract, and the triggers kept."""
    desired_functions, desired_triggers = _desired(wanted)
    stopped: dict[str, list[str]] = {}
    kept: set[tuple[str, int]] = set()
    for row in triggers:
        key = (row["trigger"], row["relid"])
        desired = desired_triggers.get(key)
        if desired is not None and desired[2].name == row["function"]:
            kept.add(key)
            continue
        await conn.execute(f"DROP TRIGGER {quote_ident(row['trigger'])} ON "
                           f"{quote_ident(row['schema'])}.{quote_ident(row['table'])}")
        stopped.setdefault(row["trigger"].removeprefix(TRIGGER_PREFIX), []).append(f"{row['schema']}.{row['table']}")
    for name, row in sorted(functions.items()):
        if name.startswith(FUNCTION_PREFIX) and row["comment"].startswith(COMMENT_PREFIX) \
                and name not in desired_functions:
            await conn.execute(f"DROP FUNCTION IF EXISTS {_qualified_signature(row['signature'])} CASCADE")
    return stopped, kept


async def _add_triggers(conn: asyncpg.Connection, wanted: list[_Wanted], kept: set[tuple[str, int]],
                        changes: list[str]) -> dict[str, list[str]]:
    """Place the missing triggers; returns the tables captured anew, per contract (a refusal goes to changes)."""
    added: dict[str, list[str]] = {}
    for key, (contract, table, function) in sorted(_desired(wanted)[1].items(), key=lambda item: item[1][1].text):
        if key in kept:
            continue
        try:
            async with conn.transaction():  # a savepoint: one table refused leaves the rest of apply alone
                await conn.execute(create_trigger(contract, table, function))
        except asyncpg.InsufficientPrivilegeError:
            changes.append(f"could not capture the changes of {table.text} for the events of {contract}: only its "
                           "owner may place a trigger on it; run `gatehouse apply` as that owner (its events are "
                           "missing until then)")
            continue
        added.setdefault(contract, []).append(table.text)
    return added


def _qualified_signature(signature: str) -> str:
    """``regprocedure`` text qualifies the name only when the schema is not on the search path."""
    return signature if signature.startswith(f"{SCHEMA}.") else f"{SCHEMA}.{signature}"


async def _has_schema(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT true FROM pg_namespace WHERE nspname = 'gatehouse'"))


async def _argument_types(conn: asyncpg.Connection, function: Function) -> list[int]:
    if not function.arguments:
        return []
    return [int(await conn.fetchval("SELECT $1::regtype::oid", function.arguments))]
