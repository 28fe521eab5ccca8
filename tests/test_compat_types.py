"""A column's type change is judged on the JSON the API emits: a widening is compatible, a narrowing is not.

Three layers: the rules table of :mod:`gatehouse.contracts.json_types`, one case per row at least (pure
Python); the same cases replayed in a real PostgreSQL (store sample values, ``ALTER`` the column, compare the
JSON before and after, write the samples again, filter with ``=``), so the table says what PostgreSQL does;
and a released contract whose columns a migration widens, then narrows. Plus: relations. (An embed that
becomes ambiguous is judged per API version, not on a signature: tests/test_relation_merge.py.)
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from conftest import ProjectFactory
from gatehouse import operations
from gatehouse.contracts import compat
from gatehouse.contracts.json_types import ARRAY_OR_NOT, INTEGER_DIGITS, OTHER, RULES, PgType, judge, parse_type
from gatehouse.contracts.lockfile import read_lock, update_lock, write_lock
from gatehouse.contracts.shape import Column, RelationRef, Signature
from gatehouse.contracts.signature import live_signatures, project_signatures
from gatehouse.project import load_project

UP, DOWN = "smallint → integer → bigint", "bigint → integer → smallint"
INT_NUMERIC = "integer type → numeric, numeric(p,0) with p ≥ its digits"
INT_DECIMALS = "integer type → numeric(p,s) with s > 0"
INT_SMALLER = "integer type → smaller numeric(p,s)"
UNLIMITED, LIMITED = "numeric(p,s) → numeric", "numeric → numeric(p,s)"
SAME_SCALE = "numeric(p,s) → numeric(q,t), q-t ≥ p-s, t = s"
MORE_DECIMALS = "numeric(p,s) → numeric(q,t), q-t ≥ p-s, t > s > 0"
NARROWER = "numeric(p,s) → numeric(q,t), q-t < p-s or t < s"
WHOLE_TO_DECIMALS = "numeric(p,s) → numeric(q,t), s ≤ 0 < t"
EXACT_FLOAT = "smallint → real; smallint, integer → double precision"
REAL_DOUBLE = "real → double precision"
FLOATS = "number ↔ real, double precision (any other)"
LONGER, SHORTER = "character varying(n), text → a limit ≥ n, or none", "character varying, text → a shorter limit"
PADDED = "character(n) ↔ any other type"
MORE_SECONDS, FEWER_SECONDS = "timestamp(p), time(p) → (q ≥ p), same time zone-ness", "timestamp(p), time(p) → (q < p)"
DATE_TIME = "date, time, timestamp ↔ another of them"
TS, TSTZ = "timestamp without time zone", "timestamp with time zone"

CASES = [
    # (old type, new type, the rule that decides, compatible?)
    ("smallint", "integer", UP, True),
    ("integer", "bigint", UP, True),
    ("smallint", "bigint", UP, True),
    ("bigint", "integer", DOWN, False),
    ("integer", "smallint", DOWN, False),
    ("integer", "numeric", INT_NUMERIC, True),
    ("integer", "numeric(10,0)", INT_NUMERIC, True),
    ("smallint", "numeric(5,0)", INT_NUMERIC, True),
    ("bigint", "numeric(19,0)", INT_NUMERIC, True),
    ("integer", "numeric(12,2)", INT_DECIMALS, False),
    ("integer", "numeric(9,0)", INT_SMALLER, False),
    ("bigint", "numeric(18,0)", INT_SMALLER, False),
    ("numeric(10,2)", "numeric", UNLIMITED, True),
    ("numeric", "numeric(38,10)", LIMITED, False),
    ("numeric(10,2)", "numeric(12,2)", SAME_SCALE, True),
    ("numeric(10,0)", "numeric(12,0)", SAME_SCALE, True),
    ("numeric(2,-3)", "numeric(5,0)", SAME_SCALE, True),
    ("numeric(10,1)", "numeric(12,2)", MORE_DECIMALS, True),
    ("numeric(10,2)", "numeric(11,3)", MORE_DECIMALS, True),
    ("numeric(12,2)", "numeric(10,2)", NARROWER, False),
    ("numeric(10,2)", "numeric(10,1)", NARROWER, False),
    ("numeric(10,2)", "numeric(10,3)", NARROWER, False),
    ("numeric(10,0)", "numeric(12,2)", WHOLE_TO_DECIMALS, False),
    ("smallint", "real", EXACT_FLOAT, True),
    ("smallint", "double precision", EXACT_FLOAT, True),
    ("integer", "double precision", EXACT_FLOAT, True),
    ("real", "double precision", REAL_DOUBLE, False),
    ("double precision", "real", FLOATS, False),
    ("integer", "real", FLOATS, False),
    ("bigint", "double precision", FLOATS, False),
    ("numeric(10,2)", "double precision", FLOATS, False),
    ("double precision", "numeric", FLOATS, False),
    ("real", "numeric", FLOATS, False),
    ("real", "integer", FLOATS, False),
    ("character varying(50)", "character varying(80)", LONGER, True),
    ("character varying(50)", "text", LONGER, True),
    ("character varying(50)", "character varying", LONGER, True),
    ("text", "character varying", LONGER, True),
    ("character varying", "text", LONGER, True),
    ("text", "character varying(50)", SHORTER, False),
    ("character varying(80)", "character varying(50)", SHORTER, False),
    ("character(3)", "character varying(3)", PADDED, False),
    ("character(3)", "text", PADDED, False),
    ("character(3)", "character(5)", PADDED, False),
    ("text", "character(5)", PADDED, False),
    ("timestamp(3) without time zone", TS, MORE_SECONDS, True),
    ("timestamp(3) with time zone", "timestamp(6) with time zone", MORE_SECONDS, True),
    ("time(0) without time zone", "time(3) without time zone", MORE_SECONDS, True),
    ("time(3) with time zone", "time with time zone", MORE_SECONDS, True),
    (TSTZ, "timestamp(3) with time zone", FEWER_SECONDS, False),
    (TS, TSTZ, DATE_TIME, False),
    (TSTZ, TS, DATE_TIME, False),
    ("date", TS, DATE_TIME, False),
    (TS, "date", DATE_TIME, False),
    ("time without time zone", "time with time zone", DATE_TIME, False),
    ("json", "jsonb", "json → jsonb", True),
    ("jsonb", "json", "jsonb → json", False),
    ("integer[]", "bigint[]", UP, True),
    ("bigint[]", "integer[]", DOWN, False),
    ("character varying(5)[]", "text[]", LONGER, True),
    ("numeric(10,2)[]", "numeric(12,2)[]", SAME_SCALE, True),
    ("integer", "integer[]", ARRAY_OR_NOT.change, False),
    ("text[]", "text", ARRAY_OR_NOT.change, False),
    ("integer", "text", OTHER.change, False),
    ("text", "integer", OTHER.change, False),
    ("boolean", "integer", OTHER.change, False),
    ("json", "text", OTHER.change, False),
    ("mood", "text", OTHER.change, False),  # an enum: a signature has its name only, so nothing is known of it
    ("integer", "positive_int", OTHER.change, False),  # a domain may refuse what integer took
]
IDS = [f"{old} → {new}" for old, new, _, _ in CASES]


@pytest.mark.parametrize(("old", "new", "rule", "compatible"), CASES, ids=IDS)
def test_type_change_rule(old: str, new: str, rule: str, compatible: bool) -> None:
    verdict = judge(old, new)
    assert (verdict.rule.change, verdict.compatible) == (rule, compatible)
    assert verdict.why


def test_every_rule_has_a_case_and_a_row_in_the_table() -> None:
    rules = [*RULES, ARRAY_OR_NOT, OTHER]
    assert {rule.change for rule in rules} == {rule for _, _, rule, _ in CASES}
    table = " ".join((compat.__doc__ or "").split())
    for rule in rules:
        assert f"{rule.change} {'no' if rule.compatible else 'yes'} " in table, rule.change


@pytest.mark.parametrize(("spelling", "parsed"), [
    ("integer", PgType("integer")),
    ("numeric(10,2)", PgType("numeric", (10, 2))),
    ("numeric(2,-3)", PgType("numeric", (2, -3))),
    ("character varying(50)", PgType("character varying", (50,))),
    ("timestamp(3) with time zone", PgType(TSTZ, (3,))),
    ("time(0) without time zone", PgType("time without time zone", (0,))),
    ("numeric(10,2)[]", PgType("numeric", (10, 2), array=True)),
    ('public."Mood"', PgType('public."Mood"')),
])
def test_format_type_spellings_are_read(spelling: str, parsed: PgType) -> None:
    assert parse_type(spelling) == parsed


def test_a_change_of_json_type_is_named() -> None:
    assert judge("integer", "text").why == "it was a JSON number, now a JSON string"
    assert judge("integer[]", "text[]").why == "it was a JSON array of JSON numbers, now a JSON array of JSON strings"


# --- the same cases, in PostgreSQL ----------------------------------------------------------------------


def _samples(t: PgType) -> list[str] | None:
    """Values of the type (as a writer would send them) at its edges; None when the test knows none."""
    if t.name in INTEGER_DIGITS:
        bound = {"smallint": 2**15, "integer": 2**31, "bigint": 2**63}[t.name]
        return [str(bound - 1), str(-bound), "42"]
    if t.name == "numeric" and t.modifiers:
        p, s = t.modifiers
        largest = "9" * (p - s) + ("." + "9" * s if s > 0 else "") if s >= 0 else "9" * p + "0" * -s
        return [largest, "-" + largest, "42", "1." + "5" * (max(s, 0) + 1), "NaN"]
    samples = {
        "numeric": ["42", "1.50", "0.1", "123456789012345678901234567890.123456789", "NaN", "Infinity"],
        "real": ["0.1", "1.2345678", "16777216", "-3.4e38", "NaN", "Infinity"],
        "double precision": ["0.1", "0.30000000000000004", "1e300", "42", "NaN", "-Infinity"],
        "text": ["x" * 1000, "ab ", ""],
        "character varying": ["x" * (t.modifiers[0] if t.modifiers else 1000), "ab ", "", "ü"],
        "character": ["ab", "x" * (t.modifiers[0] if t.modifiers else 1)],
        TS: ["2024-02-29 10:00:00.123456", "1999-12-31 23:59:59", "infinity", "-infinity"],
        TSTZ: ["2024-02-29 10:00:00.123456+02", "1999-12-31 23:59:59", "infinity"],
        "time without time zone": ["10:00:00.123456", "23:59:59.999999", "00:00:00"],
        "time with time zone": ["10:00:00.123456+02", "23:59:59"],
        "date": ["2024-02-29", "infinity"],
        # not "\u0000" in a string: json takes it, jsonb refuses it (the rule's why says so)
        "json": ['{"a": 1, "a": 2, "b": [1.50, "x"]}', "[]", '"s"', "12345678901234567890.5", "null"],
        "jsonb": ['{"a": 1, "b": [1.50, "x"]}', "[]", '"s"', "12345678901234567890.5"],
        "boolean": ["true", "false"],
    }
    return samples.get(t.name)


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _array(values: list[str]) -> str:
    return "{" + ",".join('"' + re.sub(r'(["\\])', r"\\\1", v) + '"' for v in values) + "}"


def _tagged(value: Any) -> Any:
    """A JSON value with its kind kept: 42 and 42.00 are not the same to a client that decodes an integer."""
    if isinstance(value, list):
        return ["array", [_tagged(v) for v in value]]
    if isinstance(value, dict):
        return ["object", {k: _tagged(v) for k, v in value.items()}]
    return [type(value).__name__, value]


async def _emitted(conn: asyncpg.Connection) -> Any:
    text = await conn.fetchval("SELECT coalesce(json_agg(v ORDER BY k), '[]')::text FROM t")
    return _tagged(json.loads(text, parse_float=Decimal))


async def _what_breaks(conn: asyncpg.Connection, old: str, new: str, samples: list[str]) -> list[str]:
    """What a reader or writer of the column would notice when it changes from ``old`` to ``new``."""
    await conn.execute(f"CREATE TEMP TABLE t (k serial, v {old})")
    for value in samples:
        await conn.execute(f"INSERT INTO t (v) VALUES ({_literal(value)})")
    before = await _emitted(conn)
    try:
        await conn.execute(f"ALTER TABLE t ALTER COLUMN v TYPE {new} USING v::{new}")
    except asyncpg.PostgresError as exc:
        return [f"the ALTER fails: {exc}"]
    found = []
    after = await _emitted(conn)
    if after != before:
        found.append(f"emitted {before}, now {after}")
    for value in samples:
        try:
            async with conn.transaction():
                await conn.execute(f"INSERT INTO t (v) VALUES ({_literal(value)})")
        except asyncpg.PostgresError as exc:
            found.append(f"writing {value[:20]!r} fails: {exc}")
    try:
        await conn.fetchval("SELECT count(*) FROM t WHERE v = v")
    except asyncpg.PostgresError as exc:
        found.append(f"eq filters fail: {exc}")
    return found


def _replayable() -> list[tuple[str, str, bool, list[str]]]:
    cases = []
    for old, new, _, compatible in CASES:
        parsed = parse_type(old)
        samples = _samples(parsed.element)
        if samples is not None:
            cases.append((old, new, compatible, [_array(samples)] if parsed.array else samples))
    return cases


REPLAYED = _replayable()


def test_the_replay_covers_every_rule() -> None:
    replayed = {(old, new) for old, new, _, _ in REPLAYED}
    assert {judge(old, new).rule.change for old, new in replayed} == {rule for _, _, rule, _ in CASES}


@pytest.mark.parametrize(("old", "new", "compatible", "samples"), REPLAYED,
                         ids=[f"{old} → {new}" for old, new, _, _ in REPLAYED])
async def test_type_change_rule_holds_in_postgresql(server_uri: str, old: str, new: str, compatible: bool,
                                                    samples: list[str]) -> None:
    conn = await asyncpg.connect(server_uri)
    try:
        await conn.execute("SET TimeZone = 'UTC'")
        await conn.execute("CREATE DOMAIN pg_temp.positive_int AS integer CHECK (VALUE > 0)")
        found = await _what_breaks(conn, old, new, samples)
    finally:
        await conn.close()
    if compatible:
        assert found == []
    else:
        assert found, f"{old} → {new} is judged breaking, but no sample shows it"


# --- what compare() reports -----------------------------------------------------------------------------


def _signature(*columns: tuple[str, str], relations: tuple[RelationRef, ...] = ()) -> Signature:
    """Relations sorted, as the lock and the live signatures keep them."""
    return Signature("items", 1, "main", tuple(Column(name, type_, True) for name, type_ in columns),
                     tuple(sorted(relations)))


def test_a_widening_is_reported_compatible_with_why() -> None:
    old = _signature(("qty", "integer"), ("price", "numeric(10,2)"), ("note", "text"))
    new = _signature(("qty", "bigint"), ("price", "numeric(12,2)"), ("note", "character varying(20)"))
    changes = compat.compare(old, new)
    assert [(c.kind, c.column, c.breaking) for c in changes] == [
        (compat.COLUMN_TYPE_WIDENED, "qty", False), (compat.COLUMN_TYPE_WIDENED, "price", False),
        (compat.COLUMN_TYPE_CHANGED, "note", True)]
    assert changes[0].detail == "column qty widened: integer → bigint: every value is the same JSON number"
    assert changes[2].detail.startswith("column note changed type from text to character varying(20): longer")
    assert compat.is_breaking(changes) and not compat.is_breaking(changes[:2])
    assert compat.describe_changes(changes[:2]).count("widened") == 2


CUSTOMER = RelationRef("customers", ("customer_id",), ("id",), True)
BILLING = RelationRef("customers", ("billing_id",), ("id",), True)
AS_LIST = RelationRef("customers", ("customer_id",), ("id",), False)
LINES = RelationRef("lines", ("id",), ("order_id",), False)

RELATION_CASES = [
    # (case, old relations, new relations, expected [(kind, column, breaking)])
    ("a relation added", (CUSTOMER,), (CUSTOMER, LINES), [(compat.RELATION_ADDED, "id", False)]),
    ("a second relation to the same target: judged per API version, not here", (CUSTOMER,), (CUSTOMER, BILLING),
     [(compat.RELATION_ADDED, "billing_id", False)]),
    ("the same relation twice is one", (CUSTOMER,), (CUSTOMER, CUSTOMER), []),
    ("a relation removed", (CUSTOMER, LINES), (LINES,), [(compat.RELATION_REMOVED, "customer_id", True)]),
    ("one object becomes a list", (CUSTOMER,), (AS_LIST,), [(compat.RELATION_CARDINALITY_CHANGED, "customer_id",
                                                             True)]),
]


@pytest.mark.parametrize(("case", "old", "new", "expected"), RELATION_CASES, ids=[c[0] for c in RELATION_CASES])
def test_relation_changes(case: str, old: tuple[RelationRef, ...], new: tuple[RelationRef, ...],
                          expected: list[tuple[str, str, bool]]) -> None:
    changes = compat.compare(_signature(("id", "integer"), relations=old),
                             _signature(("id", "integer"), relations=new))
    assert [(c.kind, c.column, c.breaking) for c in changes] == expected
    assert all(c.kind != compat.RELATION_BECAME_AMBIGUOUS for c in changes)


# --- end to end: a released contract, a migration that widens, then one that narrows --------------------

E2E_TOML = """
[project]
name = "widen"

[databases.main]

[apps.reader]
grants = [{ contract = "items", actions = ["read"] }]
"""
V001 = """
CREATE TABLE items (id integer PRIMARY KEY, qty integer NOT NULL, price numeric(10, 2));
INSERT INTO items VALUES (1, 2147483647, 99999999.99), (2, 0, NULL);
"""
WIDEN = "ALTER TABLE items ALTER COLUMN qty TYPE bigint, ALTER COLUMN price TYPE numeric(12, 2);"


async def _column_types(conn: asyncpg.Connection) -> dict[str, str]:
    rows = await conn.fetch("SELECT attname::text AS name, format_type(atttypid, atttypmod) AS type FROM pg_attribute "
                            "WHERE attrelid = 'items'::regclass AND attnum > 0 AND NOT attisdropped")
    return {r["name"]: r["type"] for r in rows}


async def test_a_migration_that_widens_is_compatible_and_one_that_narrows_is_not(make_project: ProjectFactory) -> None:
    project = make_project(toml=E2E_TOML, migrations={"V001__items.sql": V001},
                           contracts={"items.v1.sql": "-- not null: id, qty\nSELECT id, qty, price FROM items"})
    await operations.migrate_all(project)  # never applied: no api_v1 view holds the columns' types
    lock, report = update_lock(project, await project_signatures(project), None)
    assert report.added == ["items.v1"]
    write_lock(project.root, lock)
    released = lock.get("items.v1")
    assert released is not None

    async with operations.owner_connection(project) as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute(WIDEN)
            live = (await live_signatures(conn, project, "main"))["items.v1"]
        finally:
            await transaction.rollback()
        assert await _column_types(conn) == {"id": "integer", "qty": "integer", "price": "numeric(10,2)"}
    assert isinstance(live, Signature)
    changes = compat.compare(released.signature, live)
    assert [(c.kind, c.column, c.breaking) for c in changes] == [
        (compat.COLUMN_TYPE_WIDENED, "qty", False), (compat.COLUMN_TYPE_WIDENED, "price", False)]

    # Run it for real: the lock records the widening of the released version, no --force needed.
    (project.root / "migrations" / "V002__widen.sql").write_text(WIDEN)
    project = load_project(project.root)
    await operations.migrate_all(project)
    widened, report = update_lock(project, await project_signatures(project), read_lock(project.root))
    assert report.ok and report.refused == [] and report.rewritten == []
    assert [label for label, _ in report.updated] == ["items.v1"]
    assert "column qty widened: integer → bigint" in report.updated[0][1]
    write_lock(project.root, widened)
    relocked = read_lock(project.root)
    entry = relocked.get("items.v1") if relocked is not None else None
    assert relocked is not None and entry is not None
    assert [(c.name, c.type) for c in entry.signature.columns] == [
        ("id", "integer"), ("qty", "bigint"), ("price", "numeric(12,2)")]

    # Narrowing back is breaking (and the lock refuses it without --force).
    async with operations.owner_connection(project) as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute("ALTER TABLE items ALTER COLUMN price TYPE numeric(10, 2)")
            narrowed = await live_signatures(conn, project, "main")
        finally:
            await transaction.rollback()
        assert (await _column_types(conn))["price"] == "numeric(12,2)"
    signature = narrowed["items.v1"]
    assert isinstance(signature, Signature)
    [change] = compat.compare(entry.signature, signature)
    assert (change.kind, change.column, change.breaking) == (compat.COLUMN_TYPE_CHANGED, "price", True)
    assert change.detail.startswith("column price changed type from numeric(12,2) to numeric(10,2): larger values")
    _, refused = update_lock(project, narrowed, relocked)
    assert [label for label, _ in refused.refused] == ["items.v1"] and "numeric(10,2)" in refused.refused[0][1]
