"""Is a contract's new signature compatible with its old one, for the applications that read it?

A contract is data flowing from the database to readers, so the rules are those of a *response* in API
diff tools (oasdiff, buf): a reader breaks when something it may rely on disappears or changes.

=============================  ==========  ===========================================================
change                         breaking?   why
=============================  ==========  ===========================================================
column removed                 yes         queries naming it fail
column renamed                 yes         = removed + added; readers bind by name
column type changed            yes         any change, widening included: drivers and generated code
                                           map types, and a wider value may not fit the reader's type
column became nullable         yes         readers now see NULL where they were promised a value
column became not null         no          a stronger promise
column added                   no          contracts have no ``SELECT *``, nor do PostgREST clients
columns reordered              no          JSON is by name (CSV readers by position may notice)
relation removed               yes         ``select=...,target(...)`` embeds fail
relation one ↔ many            yes         the embed changes from an object to a list, or back
relation added                 no
=============================  ==========  ===========================================================

A rename cannot be told from a removal plus an addition with certainty; a removed and an added column
at the same position with the same type are reported as one rename, which is what they almost always are.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gatehouse.contracts.shape import RelationRef, Signature

COLUMN_REMOVED = "column-removed"
COLUMN_RENAMED = "column-renamed"
COLUMN_TYPE_CHANGED = "column-type-changed"
COLUMN_BECAME_NULLABLE = "column-became-nullable"
COLUMN_BECAME_NOT_NULL = "column-became-not-null"
COLUMN_ADDED = "column-added"
COLUMNS_REORDERED = "columns-reordered"
RELATION_REMOVED = "relation-removed"
RELATION_CARDINALITY_CHANGED = "relation-cardinality-changed"
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
            changes.append(Change(COLUMN_TYPE_CHANGED, name,
                                  f"column {name} changed type from {before.type} to {after.type}", True))
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


def _relation_changes(old: Iterable[RelationRef], new: Iterable[RelationRef]) -> list[Change]:
    def by_key(relations: Iterable[RelationRef]) -> dict[tuple[str, tuple[str, ...], tuple[str, ...]], bool]:
        return {(r.target, r.columns, r.target_columns): r.to_one for r in relations}

    before, after = by_key(old), by_key(new)
    changes: list[Change] = []
    for key in sorted(before.keys() | after.keys()):
        target, columns, target_columns = key
        text = f"{','.join(columns)} → {target}({','.join(target_columns)})"
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
