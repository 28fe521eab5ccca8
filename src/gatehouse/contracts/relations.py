"""Relations between contracts, which make embedding (``select=id,customer:users(name)``) possible.

Two sources:

* **foreign keys of the base tables, through lineage**: if ``orders.user_id → users.id`` and contract A
  exposes ``orders.user_id`` while contract B exposes ``users.id``, then A embeds B as one object
  (many-to-one) and B embeds A as a list (one-to-many; one-to-one when the key is unique);
* **declared** in ``gatehouse.toml`` (``[[relations]] from = "a.col"``, ``to = "b.col"``), for views whose
  links the database cannot know.

The same relation can come more than once: a ``[[relations]]`` entry that repeats a foreign key (common after a
table split, when the key is added later), or two identical foreign keys. Offered twice, an embed of it
would be ambiguous (PostgREST answers 300), so relations between the same contracts and columns are merged
into one that keeps the foreign key's name, and the other names stay usable as ``!hints``.

A contract's *key* is its base table's primary key, when the contract exposes every column of it; it is
what ``PUT``, upserts and ``Location`` headers use.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from gatehouse.contracts.lineage import SourceColumn
from gatehouse.contracts.model import ContractVersion
from gatehouse.db.catalog import Constraint

DEFAULT_SCHEMA = "public"


@dataclass(frozen=True, slots=True)
class Relation:
    source: str
    target: str
    source_columns: tuple[str, ...]
    target_columns: tuple[str, ...]
    to_one: bool
    name: str
    """The foreign key's name, or ``declared``: usable as an ``!hint``."""
    aliases: tuple[str, ...] = ()
    """Names of identical relations merged into this one (``declared``, a duplicate key): ``!hints`` too."""

    @property
    def hints(self) -> tuple[str, ...]:
        """The names an ``!hint`` may use for this relation."""
        return (self.name, *self.aliases)


@dataclass(frozen=True, slots=True)
class DeclaredRelation:
    source: str
    source_column: str
    target: str
    target_column: str


def _exposed(lineage: Mapping[str, SourceColumn]) -> dict[tuple[str, str, str], str]:
    """(schema, table, column) of a base column → the contract column that shows it unchanged."""
    exposed: dict[tuple[str, str, str], str] = {}
    for output, source in lineage.items():
        exposed.setdefault((source.schema or DEFAULT_SCHEMA, source.table, source.column), output)
    return exposed


def _columns_in(exposed: Mapping[tuple[str, str, str], str], schema: str, table: str,
                columns: Iterable[str]) -> tuple[str, ...] | None:
    found = tuple(exposed.get((schema, table, column)) for column in columns)
    return None if any(c is None for c in found) else tuple(c for c in found if c is not None)


def contract_keys(contracts: Iterable[ContractVersion], lineages: Mapping[str, Mapping[str, SourceColumn]],
                  constraints: Iterable[Constraint]) -> dict[str, tuple[str, ...]]:
    primary = [c for c in constraints if c.kind == "p"]
    keys: dict[str, tuple[str, ...]] = {}
    for contract in contracts:
        exposed = _exposed(lineages.get(contract.label, {}))
        for constraint in primary:
            found = _columns_in(exposed, constraint.schema, constraint.table, constraint.columns)
            if found:
                keys[contract.name] = found
                break
    return keys


def build_relations(contracts: Iterable[ContractVersion], lineages: Mapping[str, Mapping[str, SourceColumn]],
                    constraints: Iterable[Constraint],
                    declared: Iterable[DeclaredRelation] = ()) -> dict[str, list[Relation]]:
    """Every relation among the contracts of one API version, by the contract they start from."""
    served = list(contracts)
    constraints = list(constraints)
    unique = {(c.schema, c.table, c.columns) for c in constraints if c.kind in ("p", "u")}
    exposed = {c.name: _exposed(lineages.get(c.label, {})) for c in served}
    relations: dict[str, list[Relation]] = {c.name: [] for c in served}
    for fk in (c for c in constraints if c.kind == "f" and c.ref_table and c.ref_schema):
        assert fk.ref_schema is not None and fk.ref_table is not None
        for many in served:
            many_columns = _columns_in(exposed[many.name], fk.schema, fk.table, fk.columns)
            if many_columns is None:
                continue
            for one in served:
                one_columns = _columns_in(exposed[one.name], fk.ref_schema, fk.ref_table, fk.ref_columns)
                if one_columns is None:
                    continue
                relations[many.name].append(Relation(many.name, one.name, many_columns, one_columns, True, fk.name))
                reverse_to_one = (fk.schema, fk.table, fk.columns) in unique
                relations[one.name].append(
                    Relation(one.name, many.name, one_columns, many_columns, reverse_to_one, fk.name)
                )
    columns = {c.name: set(c.columns) for c in served}
    for link in declared:  # only between versions that show both columns: an older one may not have them yet
        if link.source_column in columns.get(link.source, ()) and link.target_column in columns.get(link.target, ()):
            relations[link.source].append(Relation(link.source, link.target, (link.source_column,),
                                                   (link.target_column,), True, "declared"))
            relations[link.target].append(Relation(link.target, link.source, (link.target_column,),
                                                   (link.source_column,), False, "declared"))
    return {name: _merged(found) for name, found in relations.items()}


def _merged(relations: Iterable[Relation]) -> list[Relation]:
    """One relation per (target, columns): the first one found (a foreign key before a declared one, keys in
    name order) keeps its name and its cardinality, the others' names become its aliases. The cardinality is
    the key's because the database knows it: a declared link guesses "a list" backwards, while the key of a
    table split is unique and embeds one object."""
    kept: dict[tuple[str, tuple[str, ...], tuple[str, ...]], Relation] = {}
    for relation in relations:
        key = (relation.target, relation.source_columns, relation.target_columns)
        first = kept.get(key)
        if first is None:
            kept[key] = relation
        elif relation.name not in first.hints:
            kept[key] = replace(first, aliases=(*first.aliases, relation.name))
    return list(kept.values())
