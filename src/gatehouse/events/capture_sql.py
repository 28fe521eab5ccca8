"""The SQL of change capture: the functions and triggers that write an evented contract's events.

Per evented contract version, in the ``gatehouse`` schema, ``ev_<contract>_<table hash>()``: the trigger function
of each captured table, behind an ``AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW`` trigger named
``gatehouse_event_<contract>``. Shared by every contract: ``ev_present`` (whether an aggregate's last event
showed it).

Trigger functions are ``SECURITY DEFINER`` (owned by apply's login, which owns the outbox; a writer needs no
privilege on it, and cannot write events of its own: EXECUTE is revoked from PUBLIC on every function here)
with a pinned ``search_path`` (every name in them is qualified), a pinned ``TimeZone`` (payloads carry
timestamps in UTC) and, when the key has a type whose text depends on it, a pinned ``DateStyle`` (a key reads the
same from every session).

**Shaping** a row of the key table as the contract version shows it is the view's own definition with the key
table replaced by the row (:mod:`.capture_plan`), inlined in the trigger's statements. An insert into the key
table, the common case, is one statement: shape the new row and write its ``created`` event, or nothing when the
contract does not show it.

**Which event.** On the key table, the row before (``OLD``) and after (``NEW``) are both shaped: shown after
but not before is ``created``, before but not after ``deleted`` (its payload as it was shown), both ``updated``;
a changed key is ``deleted`` of the old key and ``created`` of the new. "Shown before" is judged from the old
row joined to the other tables as they are now; when that says no but the aggregate's last event said it was
shown (another table changed in the same transaction), it counts as shown, and the ``deleted`` payload is its
key. On another table, every key row it joins to (before and after) is locked, then shaped as it is now: shown
is ``updated`` (``created`` if its last event was ``deleted``), not shown is ``deleted`` with the key as payload
(unless its last event already was). An update that changes no column the contract reads makes no event.

**Versions.** An event's ``aggregate_version`` is its own ``seq``, taken while the writer holds the aggregate's
key row: the row lock of an update or delete, the key's unique index entry of an insert (nobody else can see the
row before it commits), and the lock the trigger of another table takes (``FOR NO KEY UPDATE``, which foreign
key checks do not wait for). Two transactions writing events of one aggregate therefore take their numbers in
the order they commit. Counting each aggregate's events in a table of their own (an upsert per event), with the
shaping and the writing in functions of their own, took twice the instructions per insert (callgrind,
bench/README.md); ``gatehouse.aggregate_versions`` now keeps only the last version and presence of aggregates
whose events the relay has deleted from the outbox (:mod:`.relay_store`), which is where ``ev_present`` and
mirror snapshots look when the outbox has none.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from gatehouse.db import quote_ident
from gatehouse.events.capture_plan import ROW, Captured, CapturePlan, Hop, Table

SCHEMA = "gatehouse"
TRIGGER_PREFIX = "gatehouse_event_"
FUNCTION_PREFIX = "ev_"
COMMENT_PREFIX = "gatehouse events of "
"""Each per-contract function's comment names the contract version it was made for (``... of orders.v1``)."""
PINNED = "SET search_path = pg_catalog, pg_temp SET TimeZone = 'UTC'"
PINNED_DATESTYLE = " SET DateStyle = 'ISO, YMD'"
"""Added when a key column's text depends on DateStyle (a date or time key), so its ``aggregateid`` is the same
from every session (mirror snapshots read keys in the same settings: :data:`.mirror_sql.CAPTURE_SETTINGS`)."""

AGGREGATE_VERSIONS_DDL = """
CREATE TABLE IF NOT EXISTS gatehouse.aggregate_versions (
    aggregatetype  text NOT NULL,
    aggregateid    text NOT NULL,
    version        bigint NOT NULL,
    present        boolean NOT NULL,
    PRIMARY KEY (aggregatetype, aggregateid)
) WITH (fillfactor = 80);
"""
"""The last version of each aggregate whose events left the outbox, and whether that event showed it (``present``:
not ``deleted``). Written by the relay's cleaner as it deletes events; before this release, by every event."""

HELPERS = {
    "ev_present(text, text)": """
BEGIN
    RETURN (SELECT s.present FROM (
        (SELECT o.aggregate_version AS version, o.type <> 'deleted' AS present FROM gatehouse.outbox o
         WHERE o.aggregatetype = $1 AND o.aggregateid = $2 AND o.aggregate_version > 0
         ORDER BY o.aggregate_version DESC LIMIT 1)
        UNION ALL
        SELECT a.version, a.present FROM gatehouse.aggregate_versions a
        WHERE a.aggregatetype = $1 AND a.aggregateid = $2
    ) AS s ORDER BY s.version DESC LIMIT 1);
END
""",
}
"""``ev_present``: whether the aggregate's newest event showed it (NULL: it never had one). The newest of the
outbox's events and of what the cleaner kept of deleted ones, by version."""
HELPER_RETURNS = {"ev_present(text, text)": "boolean"}
RETIRED_HELPERS = ("ev_emit(text, integer, text, text, jsonb)",)
"""Helpers of earlier releases, dropped by apply once no trigger function calls them."""
OUTBOX_SEQUENCE = "gatehouse.outbox_seq_seq"
"""The outbox's ``seq`` identity: each event takes its number from it, for ``seq`` and ``aggregate_version``."""
NUMBERS_ABOVE_KEPT = f"""
SELECT setval('{OUTBOX_SEQUENCE}', kept) FROM (SELECT max(version) AS kept FROM gatehouse.aggregate_versions) AS k
WHERE kept > (SELECT last_value FROM {OUTBOX_SEQUENCE})
"""
"""Run by apply: numbers are taken above every version kept (an outbox of an earlier release counted each aggregate's
events there; an outbox emptied with ``RESTART IDENTITY`` would start again at 1). Only ever moves forward."""
INSERT_EVENT = ("INSERT INTO gatehouse.outbox (seq, aggregate_version, aggregatetype, aggregateid, type, payload, "
                "contract_version) OVERRIDING SYSTEM VALUE")


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


def _settings(plan: CapturePlan) -> str:
    return PINNED + (PINNED_DATESTYLE if plan.key_follows_datestyle else "")


def _shaped(plan: CapturePlan, record: str) -> str:
    """The rows (none or one) of the contract version showing ``record``, a row of the key table."""
    return plan.shape_sql.replace(ROW, f"(SELECT ({record}).*)", 1)


def _shape(plan: CapturePlan, record: str) -> str:
    """``record`` as the contract version shows it (jsonb), or NULL when it does not show it."""
    return f"(SELECT to_jsonb(gh_v) FROM (\n{_shaped(plan, record)}\n    ) AS gh_v LIMIT 1)"


def _emit(plan: CapturePlan, key: str, kind: str, payload: str) -> str:
    return (f"{INSERT_EVENT}\n        SELECT gh_n, gh_n, {literal(plan.contract)}, {key}, {kind}, {payload}, "
            f"{plan.version} FROM nextval({literal(OUTBOX_SEQUENCE)}) AS gh_n;")


def _emit_created(plan: CapturePlan) -> str:
    """One statement for an insert into the key table: shape ``NEW`` and write its event, if the contract shows it
    (a number is taken only for a row written)."""
    return (f"{INSERT_EVENT}\n        SELECT gh_s.n, gh_s.n, {literal(plan.contract)}, {_key_text('NEW', plan)}, "
            f"'created', gh_s.p, {plan.version}\n        FROM (SELECT nextval({literal(OUTBOX_SEQUENCE)}) AS n, "
            f"to_jsonb(gh_v) AS p FROM (\n{_shaped(plan, 'NEW')}\n        ) AS gh_v LIMIT 1) AS gh_s;")


def key_trigger(plan: CapturePlan, captured: Captured) -> Function:
    """The trigger function of the key table: created, updated or deleted, judged by shaping OLD and NEW."""
    name = literal(plan.contract)
    body = f"""
DECLARE
    gh_was jsonb;
    gh_now jsonb;
    gh_old_key text;
    gh_new_key text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        {_emit_created(plan)}
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' AND {_unchanged(captured.watched)} THEN
        RETURN NULL;
    END IF;
    gh_old_key := {_key_text("OLD", plan)};
    gh_was := {_shape(plan, "OLD")};
    IF gh_was IS NULL AND gatehouse.ev_present({name}, gh_old_key) THEN
        gh_was := {_key_object("OLD", plan)};
    END IF;
    IF TG_OP = 'UPDATE' THEN
        gh_new_key := {_key_text("NEW", plan)};
        gh_now := {_shape(plan, "NEW")};
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
    return Function(trigger_function(plan.contract, captured.table), "", "trigger", body, _settings(plan),
                    definer=True)


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
    """The trigger function of a table the contract joins: the key rows it joins to, before and after, locked in
    key order, then shaped as they are now (a statement after the lock sees what committed while it waited)."""
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
        FOR NO KEY UPDATE OF gh_k
    LOOP
        gh_key := {_key_text("gh_row", plan)};
        gh_shown := {_shape(plan, "gh_row")};
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
    return Function(trigger_function(plan.contract, captured.table), "", "trigger", body, _settings(plan),
                    definer=True)


def plan_functions(plan: CapturePlan) -> list[tuple[Function, Captured]]:
    """Every function of ``plan``, each with the table whose trigger runs it."""
    return [((key_trigger if captured.table == plan.key_table else other_trigger)(plan, captured), captured)
            for captured in plan.tables]


def create_trigger(contract: str, table: Table, function: Function) -> str:
    return (f"CREATE TRIGGER {quote_ident(trigger_name(contract))} AFTER INSERT OR UPDATE OR DELETE ON "
            f"{table.qualified} FOR EACH ROW EXECUTE FUNCTION {function.signature}")
