"""Is a contract's new signature compatible with its old one, for the applications that read it?

A contract is data flowing from the database to readers, so the rules are those of a *response* in API
diff tools (oasdiff, buf): a reader breaks when something it may rely on disappears or changes.

========================================================  =========  ==========================================
change                                                    breaking?  why
========================================================  =========  ==========================================
column removed                                            yes        queries naming it fail
column renamed                                            yes        = removed + added; readers bind by name
column type changed                                       see below  judged on the JSON it emits
column became nullable                                    yes        readers now see NULL where they were
                                                                     promised a value
column became not null                                    no         a stronger promise
column added                                              no         contracts have no ``SELECT *``, nor do
                                                                     PostgREST clients
columns reordered                                         no         JSON is by name (CSV readers by position
                                                                     may notice)
relation removed                                          yes        ``select=...,target(...)`` embeds fail
relation one ↔ many                                       yes        the embed changes from an object to a
                                                                     list, or back
relation added                                            no
========================================================  =========  ==========================================

**A column's type** may change when every value the old type held is emitted as the same JSON (same JSON
type and value, a whole number still whole) and every value a writer could send is still accepted
(:mod:`gatehouse.contracts.json_types`, whose ``RULES`` are these rows, tried in order; ``T[] → U[]`` is
judged as ``T → U``). The new type may hold more: a widening only adds values.

========================================================  =========  ==========================================
type change                                               breaking?  why
========================================================  =========  ==========================================
smallint → integer → bigint                               no         the same JSON number
bigint → integer → smallint                               yes        larger values are refused
integer type → numeric, numeric(p,0) with p ≥ its digits  no         the same JSON number (digits: 5, 10, 19)
integer type → numeric(p,s) with s > 0                    yes        42 becomes 42.00: a client decoding an
                                                                     integer fails
integer type → smaller numeric(p,s)                       yes        larger values are refused
numeric(p,s) → numeric                                    no         the same numbers, as stored
numeric → numeric(p,s)                                    yes        larger values refused, decimals rounded
numeric(p,s) → numeric(q,t), q-t ≥ p-s, t = s             no         the same JSON number (also when both
                                                                     scales are ≤ 0)
numeric(p,s) → numeric(q,t), q-t ≥ p-s, t > s > 0         no         the same JSON number, with more decimals
                                                                     (1.50 becomes 1.500)
numeric(p,s) → numeric(q,t), q-t < p-s or t < s           yes        larger values refused, decimals rounded
numeric(p,s) → numeric(q,t), s ≤ 0 < t                    yes        42 becomes 42.00 (as above)
smallint → real; smallint, integer → double precision     no         exact in the float, written the same
real → double precision                                   yes        0.1 becomes 0.10000000149011612
number ↔ real, double precision (any other)               yes        values change (2147483647 as real is
                                                                     2.1474836e+09; numeric's 42.00 is 42)
character varying(n), text → a limit ≥ n, or none         no         the same JSON string
character varying, text → a shorter limit                 yes        longer strings are refused
character(n) ↔ any other type                             yes        padding: "ab " as character(3), "ab" as
                                                                     text
timestamp(p), time(p) → (q ≥ p), same time zone-ness      no         the same JSON string
timestamp(p), time(p) → (q < p)                           yes        fractions of a second are rounded
date, time, timestamp ↔ another of them                   yes        the string's format changes (an offset
                                                                     appears or goes, a time is added)
json → jsonb                                              no         the same JSON value (key order and
                                                                     spaces aside; jsonb refuses \\u0000)
jsonb → json                                              yes        json has no equality: eq, cs, cd fail
T[] ↔ T                                                   yes        an array becomes a single value
any other change                                          yes        numbers ↔ strings, enums, domains, types
                                                                     not in this table
========================================================  =========  ==========================================

**An embed that became ambiguous** (one relation to a target became two or more, so ``target(*)`` answers
300) is breaking too, but it cannot be judged here: a signature records the union of a contract version's
relations over every API version that serves it, while the server builds them per API version, and a
relation that only an unreleased version offers breaks nobody. :mod:`gatehouse.contracts.ambiguity` judges
it per API version; ``migrate plan`` reports it as a :class:`Change` of kind
:data:`RELATION_BECAME_AMBIGUOUS`.

A rename cannot be told from a removal plus an addition with certainty; a removed and an added column
at the same position with the same type are reported as one rename, which is what they almost always are.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gatehouse.contracts.json_types import judge
from gatehouse.contracts.shape import RelationRef, Signature

COLUMN_REMOVED = "column-removed"
COLUMN_RENAMED = "column-renamed"
COLUMN_TYPE_CHANGED = "column-type-changed"
COLUMN_TYPE_WIDENED = "column-type-widened"
COLUMN_BECAME_NULLABLE = "column-became-nullable"
COLUMN_BECAME_NOT_NULL = "column-became-not-null"
COLUMN_ADDED = "column-added"
COLUMNS_REORDERED = "columns-reordered"
RELATION_REMOVED = "relation-removed"
RELATION_CARDINALITY_CHANGED = "relation-cardinality-changed"
RELATION_BECAME_AMBIGUOUS = "relation-became-ambiguous"
RELATION_ADDED = "relation-added"


@dataclass(frozen=True, slots=True)
class Change:
    kind: str
    column: str | None
    """The contract column (for a relation: its columns, comma-separated); None when about the whole."""
    detail: str
    breaking: bool

    def __str__(self) -> str:
        return self.detail


def _renames(old: Signature, new: Signature, removed: list[str], added: list[str]) -> dict[str, str]:
    """old name → new name, for a removed and an added column at the same position with the same type."""
    renames: dict[str, str] = {}
    old_names = [c.name for c in old.columns]
    new_names = [c.name for c in new.columns]
    for name in removed:
        position = old_names.index(name)
        if position < len(new_names) and new_names[position] in added:
            candidate = new_names[position]
            old_column, new_column = old.column(name), new.column(candidate)
            if old_column and new_column and old_column.type == new_column.type:
                renames[name] = candidate
    return renames


def _type_change(name: str, old: str, new: str) -> Change:
    verdict = judge(old, new)
    if verdict.compatible:
        return Change(COLUMN_TYPE_WIDENED, name, f"column {name} widened: {old} → {new}: {verdict.why}", False)
    return Change(COLUMN_TYPE_CHANGED, name, f"column {name} changed type from {old} to {new}: {verdict.why}", True)


def _column_changes(old: Signature, new: Signature) -> list[Change]:
    old_names = [c.name for c in old.columns]
    new_names = [c.name for c in new.columns]
    removed = [n for n in old_names if n not in new_names]
    added = [n for n in new_names if n not in old_names]
    renames = _renames(old, new, removed, added)
    changes: list[Change] = []
    for name in removed:
        if name in renames:
            changes.append(Change(COLUMN_RENAMED, name, f"column {name} was renamed to {renames[name]}", True))
        else:
            changes.append(Change(COLUMN_REMOVED, name, f"column {name} was removed", True))
    for name in old_names:
        before, after = old.column(name), new.column(name)
        if before is None or after is None:
            continue
        if before.type != after.type:
            changes.append(_type_change(name, before.type, after.type))
        if not before.nullable and after.nullable:
            changes.append(Change(COLUMN_BECAME_NULLABLE, name, f"column {name} may now be null", True))
        elif before.nullable and not after.nullable:
            changes.append(Change(COLUMN_BECAME_NOT_NULL, name, f"column {name} is now declared not null", False))
    renamed_to = set(renames.values())
    for name in added:
        if name not in renamed_to:
            changes.append(Change(COLUMN_ADDED, name, f"column {name} was added", False))
    kept_old = [n for n in old_names if n in new_names]
    kept_new = [n for n in new_names if n in old_names]
    if kept_old != kept_new:
        changes.append(Change(COLUMNS_REORDERED, None, f"columns reordered: {', '.join(kept_new)}", False))
    return changes


def _relation_text(relation: RelationRef) -> str:
    return f"{','.join(relation.columns)} → {relation.target}({','.join(relation.target_columns)})"


def _relation_changes(old: Sequence[RelationRef], new: Sequence[RelationRef]) -> list[Change]:
    def by_key(relations: Iterable[RelationRef]) -> dict[tuple[str, tuple[str, ...], tuple[str, ...]], bool]:
        return {(r.target, r.columns, r.target_columns): r.to_one for r in relations}

    before, after = by_key(old), by_key(new)
    changes: list[Change] = []
    for key in sorted(before.keys() | after.keys()):
        target, columns, target_columns = key
        text = _relation_text(RelationRef(target, columns, target_columns, True))
        if key not in after:
            changes.append(Change(RELATION_REMOVED, ",".join(columns),
                                  f"relation {text} is gone: embedding {target} fails", True))
        elif key not in before:
            changes.append(Change(RELATION_ADDED, ",".join(columns), f"relation {text} was added", False))
        elif before[key] != after[key]:
            shape = "one object" if after[key] else "a list"
            changes.append(Change(RELATION_CARDINALITY_CHANGED, ",".join(columns),
                                  f"relation {text} now embeds {shape}", True))
    return changes


def compare(old: Signature, new: Signature) -> list[Change]:
    """Every difference from ``old`` to ``new``, each marked breaking or not (see the module's table)."""
    return _column_changes(old, new) + _relation_changes(old.relations, new.relations)


def is_breaking(changes: Iterable[Change]) -> bool:
    return any(change.breaking for change in changes)


def describe_changes(changes: Iterable[Change]) -> str:
    return "; ".join(change.detail for change in changes)
