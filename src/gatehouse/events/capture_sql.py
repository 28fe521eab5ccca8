"""The SQL of change capture: the functions and triggers that write an evented contract's events.

Per evented contract version, in the ``gatehouse`` schema:

* ``ev_<contract>_shape(<key table>)``: a row of the key table as the contract version shows it (jsonb), or
  NULL when the contract does not show it (a ``WHERE`` leaves it out);
* ``ev_<contract>_<table hash>()``: the trigger function of each captured table, behind an ``AFTER INSERT OR
  UPDATE OR DELETE ... FOR EACH ROW`` trigger named ``gatehouse_event_<contract>``.

Shared by every contract: ``ev_emit`` (count the aggregate's version, write the outbox row) and ``ev_present``.

Trigger functions are ``SECURITY DEFINER`` (owned by apply's login, which owns the outbox; a writer needs no
privilege on it, and cannot write events of its own: EXECUTE is revoked from PUBLIC on every function here)
with a pinned ``search_path`` (every name in them is qualified) and pinned ``TimeZone``/``DateStyle`` (a key or a
timestamp reads the same from every session: payloads carry timestamps in UTC).

**Which event.** On the key table, the row before (``OLD``) and after (``NEW``) are both shaped: shown after
but not before is ``created``, before but not after ``deleted`` (its payload as it was shown), both ``updated``;
a changed key is ``deleted`` of the old key and ``created`` of the new. "Shown before" is judged from the old
row joined to the other tables as they are now; when that says no but the aggregate's last event said it was
shown (another table changed in the same transaction), it counts as shown, and the ``deleted`` payload is its
key. On another table, every key row it joins to (before and after) is shaped as it is now: shown is
``updated`` (``created`` if its last event was ``deleted``), not shown is ``deleted`` with the key as payload
(unless its last event already was). An update that changes no column the contract reads makes no event.

**Versions.** ``gatehouse.aggregate_versions`` counts each aggregate's events; the writer updates its row, so
two transactions changing one aggregate take its row lock in turn and their versions follow their commits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from gatehouse.db import quote_ident
from gatehouse.events.capture_plan import Captured, CapturePlan, Hop, Table

SCHEMA = "gatehouse"
TRIGGER_PREFIX = "gatehouse_event_"
FUNCTION_PREFIX = "ev_"
COMMENT_PREFIX = "gatehouse events of "
"""Each per-contract function's comment names the contract version it was made for (``... of orders.v1``)."""
SETTINGS = "SET search_path = pg_catalog, pg_temp SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD'"

AGGREGATE_VERSIONS_DDL = """
CREATE TABLE IF NOT EXISTS gatehouse.aggregate_versions (
    aggregatetype  text NOT NULL,
    aggregateid    text NOT NULL,
    version        bigint NOT NULL,
    present        boolean NOT NULL,
    PRIMARY KEY (aggregatetype, aggregateid)
) WITH (fillfactor = 80);
"""
"""One row per aggregate that ever had an event (kept: a version must keep growing after a delete, or a consumer's
tombstone would outrank the row created again). ``present``: its last event was not ``deleted``."""

HELPERS = {
    "ev_emit(text, integer, text, text, jsonb)": """
DECLARE
    gh_version bigint;
BEGIN
    INSERT INTO gatehouse.aggregate_versions AS a (aggregatetype, aggregateid, version, present)
    VALUES ($1, $3, 1, $4 <> 'deleted')
    ON CONFLICT (aggregatetype, aggregateid) DO UPDATE SET version = a.version + 1, present = excluded.present
    RETURNING a.version INTO gh_version;
    INSERT INTO gatehouse.outbox (aggregatetype, aggregateid, type, payload, contract_version, aggregate_version)
    VALUES ($1, $3, $4, $5, $2, gh_version);
END
""",
    "ev_present(text, text)": """
BEGIN
    RETURN (SELECT a.present FROM gatehouse.aggregate_versions a WHERE a.aggregatetype = $1 AND a.aggregateid = $2);
END
""",
}
HELPER_RETURNS = {"ev_emit(text, integer, text, text, jsonb)": "void", "ev_present(text, text)": "boolean"}


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def dollar_quoted(body: str) -> str:
    tag, n = "$gh$", 0
    while tag in body:
        n += 1
        tag = f"$gh{n}$"
    return f"{tag}{body}{tag}"


def trigger_name(contract: str) -> str:
    return f"{TRIGGER_PREFIX}{contract}"


def shape_function(contract: str) -> str:
    return f"{FUNCTION_PREFIX}{contract}_shape"


def trigger_function(contract: str, table: Table) -> str:
    digest = hashlib.sha256(table.text.encode()).hexdigest()[:8]
    return f"{FUNCTION_PREFIX}{contract}_{digest}"


@dataclass(frozen=True, slots=True)
class Function:
    name: str
    arguments: str
    """The argument types as PostgreSQL prints them (``public.orders``, or empty)."""
    returns: str
    body: str
    settings: str = ""
    definer: bool = False

    @property
    def signature(self) -> str:
        return f"{SCHEMA}.{quote_ident(self.name)}({self.arguments})"

    def create(self, comment: str | None) -> list[str]:
        security = " SECURITY DEFINER" if self.definer else ""
        statements = [f"CREATE OR REPLACE FUNCTION {self.signature} RETURNS {self.returns} LANGUAGE plpgsql"
                      f"{' STABLE' if self.returns == 'jsonb' else ''}{security} {self.settings} AS "
                      f"{dollar_quoted(self.body)}",
                      f"REVOKE ALL ON FUNCTION {self.signature} FROM PUBLIC"]
        if comment is not None:
            statements.append(f"COMMENT ON FUNCTION {self.signature} IS {literal(comment)}")
        return statements


def _key_text(record: str, plan: CapturePlan) -> str:
    if len(plan.key) == 1:
        return f"({record}.{quote_ident(plan.key[0][1])})::text"
    return "jsonb_build_array(" + ", ".join(f"{record}.{quote_ident(c)}" for _, c in plan.key) + ")::text"


def _key_object(record: str, plan: CapturePlan) -> str:
    return "jsonb_build_object(" + ", ".join(f"{literal(shown)}, {record}.{quote_ident(column)}"
                                             for shown, column in plan.key) + ")"


def _unchanged(watched: tuple[str, ...] | None) -> str:
    if watched is None:
        return "OLD::text IS NOT DISTINCT FROM NEW::text"
    old = ", ".join(f"(OLD.{quote_ident(c)})::text" for c in watched)
    new = ", ".join(f"(NEW.{quote_ident(c)})::text" for c in watched)
    return f"ROW({old}) IS NOT DISTINCT FROM ROW({new})"


def _emit(plan: CapturePlan, key: str, kind: str, payload: str) -> str:
    return f"PERFORM gatehouse.ev_emit({literal(plan.contract)}, {plan.version}, {key}, {kind}, {payload});"


def shape(plan: CapturePlan) -> Function:
    body = f"""
BEGIN
    RETURN (SELECT to_jsonb(v) FROM (
{plan.shape_sql}
    ) AS v LIMIT 1);
END
"""
    return Function(shape_function(plan.contract), plan.key_table.qualified, "jsonb", body)


def key_trigger(plan: CapturePlan, captured: Captured) -> Function:
    """The trigger function of the key table: created, updated or deleted, judged by shaping OLD and NEW."""
    shaping = f"gatehouse.{quote_ident(shape_function(plan.contract))}"
    name = literal(plan.contract)
    body = f"""
DECLARE
    gh_was jsonb;
    gh_now jsonb;
    gh_old_key text;
    gh_new_key text;
BEGIN
    IF TG_OP = 'UPDATE' AND {_unchanged(captured.watched)} THEN
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        gh_old_key := {_key_text("OLD", plan)};
        gh_was := {shaping}(OLD);
        IF gh_was IS NULL AND gatehouse.ev_present({name}, gh_old_key) THEN
            gh_was := {_key_object("OLD", plan)};
        END IF;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        gh_new_key := {_key_text("NEW", plan)};
        gh_now := {shaping}(NEW);
    END IF;
    IF gh_was IS NOT NULL AND (gh_now IS NULL OR gh_old_key <> gh_new_key) THEN
        {_emit(plan, "gh_old_key", "'deleted'", "gh_was")}
    END IF;
    IF gh_now IS NOT NULL THEN
        {_emit(plan, "gh_new_key", "CASE WHEN gh_was IS NOT NULL AND gh_old_key = gh_new_key "
                                   "THEN 'updated' ELSE 'created' END", "gh_now")}
    END IF;
    RETURN NULL;
END
"""
    return Function(trigger_function(plan.contract, captured.table), "", "trigger", body, SETTINGS, definer=True)


def _ways(ways: tuple[tuple[tuple[str, str], ...], ...], here: str, there: str) -> str:
    return "(" + " OR ".join("(" + " AND ".join(f"{there}.{quote_ident(b)} = {here}.{quote_ident(a)}"
                                                for a, b in way) + ")" for way in ways) + ")"


def _affected(record: str, path: tuple[Hop, ...], plan: CapturePlan) -> str:
    """The key columns of the key rows ``record`` (a row of the path's first table) joins to."""
    aliases = [f"gh_h{i}" for i in range(1, len(path) + 1)]
    last = aliases[-1]
    sql = f"SELECT {', '.join(f'{last}.{quote_ident(c)}' for _, c in plan.key)} FROM {path[-1].to.qualified} {last}"
    for i in range(len(path) - 1, 0, -1):  # walk back from the key table to the first step
        sql += f" JOIN {path[i - 1].to.qualified} {aliases[i - 1]} ON {_ways(path[i].ways, aliases[i - 1], aliases[i])}"
    return f"{sql} WHERE {_ways(path[0].ways, record, aliases[0])}"


def other_trigger(plan: CapturePlan, captured: Captured) -> Function:
    """The trigger function of a table the contract joins: the key rows it joins to, before and after, shaped now."""
    shaping = f"gatehouse.{quote_ident(shape_function(plan.contract))}"
    name = literal(plan.contract)
    columns = ", ".join(f"gh_k.{quote_ident(c)}" for _, c in plan.key)
    body = f"""
DECLARE
    gh_row {plan.key_table.qualified};
    gh_key text;
    gh_shown jsonb;
    gh_present boolean;
BEGIN
    IF TG_OP = 'UPDATE' AND {_unchanged(captured.watched)} THEN
        RETURN NULL;
    END IF;
    FOR gh_row IN
        SELECT gh_k.* FROM {plan.key_table.qualified} gh_k
        WHERE ({columns}) IN ({_affected("OLD", captured.path, plan)} UNION {_affected("NEW", captured.path, plan)})
        ORDER BY {columns}
    LOOP
        gh_key := {_key_text("gh_row", plan)};
        gh_shown := {shaping}(gh_row);
        gh_present := gatehouse.ev_present({name}, gh_key);
        IF gh_shown IS NOT NULL THEN
            {_emit(plan, "gh_key", "CASE WHEN gh_present IS FALSE THEN 'created' ELSE 'updated' END", "gh_shown")}
        ELSIF gh_present IS NOT FALSE THEN
            {_emit(plan, "gh_key", "'deleted'", _key_object("gh_row", plan))}
        END IF;
    END LOOP;
    RETURN NULL;
END
"""
    return Function(trigger_function(plan.contract, captured.table), "", "trigger", body, SETTINGS, definer=True)


def plan_functions(plan: CapturePlan) -> list[tuple[Function, Captured | None]]:
    """Every function of ``plan``, each with the table whose trigger runs it (None for the shape)."""
    functions: list[tuple[Function, Captured | None]] = [(shape(plan), None)]
    for captured in plan.tables:
        make = key_trigger if captured.table == plan.key_table else other_trigger
        functions.append((make(plan, captured), captured))
    return functions


def create_trigger(contract: str, table: Table, function: Function) -> str:
    return (f"CREATE TRIGGER {quote_ident(trigger_name(contract))} AFTER INSERT OR UPDATE OR DELETE ON "
            f"{table.qualified} FOR EACH ROW EXECUTE FUNCTION {function.signature}")
