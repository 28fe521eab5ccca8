"""Relations between contracts, which make embedding (``select=id,customer:users(name)``) possible.

Three sources:

* **foreign keys of the base tables, through lineage**: if ``orders.user_id → users.id`` and contract A
  exposes ``orders.user_id`` while contract B exposes ``users.id``, then A embeds B as one object
  (many-to-one) and B embeds A as a list (one-to-many; one-to-one when the key is unique);
* **declared** in ``gatehouse.toml`` (``[[relations]] from = "a.col"``, ``to = "b.col"``), for views whose
  links the database cannot know;
* **through a junction** (many-to-many), derived from the first kind as PostgREST derives it: a table with
  two foreign keys (two different constraints) whose columns are all part of its primary key joins the two
  tables it points at. A contract exposing both keys' columns is the junction between the contracts that
  expose the referenced columns: ``users`` embeds ``tasks`` as a list through ``users_tasks``. A foreign key
  that is unique on its own (one-to-one) makes no junction, nor does a declared relation.

The same relation can come more than once: a ``[[relations]]`` entry that repeats a foreign key (common after a
table split, when the key is added later), or two identical foreign keys. Offered twice, an embed of it
would be ambiguous (PostgREST answers 300), so relations between the same contracts and columns are merged
into one that keeps the foreign key's name, and the other names stay usable as ``!hints``. Relations through
two junction contracts stay two, as in PostgREST: one junction may show fewer rows than the other.

A contract's *key* is its base table's primary key, when the contract exposes every column of it; it is
what ``PUT``, upserts and ``Location`` headers use.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, TypeAlias

from gatehouse.contracts.lineage import SourceColumn
from gatehouse.contracts.model import ContractVersion
from gatehouse.db.catalog import Constraint

DEFAULT_SCHEMA = "public"
DECLARED = "declared"
"""The name of a relation from ``[[relations]]`` (it has no constraint name of its own)."""
Cardinality: TypeAlias = Literal["many-to-one", "one-to-many", "one-to-one", "many-to-many"]


@dataclass(frozen=True, slots=True)
class Junction:
    """The contract a many-to-many relation goes through, and its two foreign keys."""

    contract: str
    source_key: str
    """The foreign key from the junction to the relation's source."""
    target_key: str
    source_columns: tuple[str, ...]
    """The junction's columns that match the relation's ``source_columns``, in order."""
    target_columns: tuple[str, ...]
    """The junction's columns that match the relation's ``target_columns``, in order."""


@dataclass(frozen=True, slots=True)
class Relation:
    source: str
    target: str
    source_columns: tuple[str, ...]
    target_columns: tuple[str, ...]
    to_one: bool
    name: str
    """The foreign key's name, ``declared``, or the junction's contract: usable as an ``!hint``."""
    aliases: tuple[str, ...] = ()
    """Names of identical relations merged into this one (``declared``, a duplicate key): ``!hints`` too."""
    cardinality: Cardinality | None = None
    """None: many-to-one when ``to_one``, else one-to-many (what a relation built without it means)."""
    junction: Junction | None = None
    """Set for many-to-many: the rows of ``target`` are those the junction pairs with the source's row."""

    @property
    def hints(self) -> tuple[str, ...]:
        """The names an ``!hint`` may use for this relation."""
        return (self.name, *self.aliases)

    @property
    def kind(self) -> Cardinality:
        if self.cardinality is not None:
            return self.cardinality
        return "many-to-one" if self.to_one else "one-to-many"

    @property
    def is_self(self) -> bool:
        """From a contract to itself (a table's key referencing the same table)."""
        return self.source == self.target

    @property
    def relationship(self) -> str:
        """How PostgREST describes it in a 300's details: ``fk using a(x) and b(y)``, ``junction using
        fk1(x) and fk2(y)``."""
        if self.junction is not None:
            j = self.junction
            return (f"{j.contract} using {j.source_key}({', '.join(j.source_columns)}) and "
                    f"{j.target_key}({', '.join(j.target_columns)})")
        return (f"{self.name} using {self.source}({', '.join(self.source_columns)}) and "
                f"{self.target}({', '.join(self.target_columns)})")


def _single(columns: tuple[str, ...], name: str) -> bool:
    return len(columns) == 1 and columns[0] == name


def embeds_as(relation: Relation, target: str) -> bool:
    """Does ``select=target(...)``, without a hint, name this relation? PostgREST's rules:

    * the target contract's name; or, except through a junction, the foreign key's name or the source's
      column when the key has one (``select=*,client_id(*)``, ``select=*,projects_client_id_fkey(*)``);
    * from a contract to itself, the name means the one-to-many side (its children), and the many-to-one side
      (the parent) is named by its column (``select=*,parent(*)``). A self relation through a junction is
      never named alone: embed the junction, then the other side.

    PostgREST only takes a key's or a column's name when the target is a table, not a view; every contract is
    a view, and stands for the table the app used to read, so gatehouse takes them for every contract (when
    several contracts expose the referenced table, the name matches each of them, and the answer is a 300)."""
    if relation.is_self:
        if relation.junction is not None:
            return False
        return ((target == relation.target and relation.kind == "one-to-many")
                or (relation.kind == "many-to-one" and _single(relation.source_columns, target)))
    if target == relation.target:
        return True
    if relation.junction is not None:
        return False
    return (target != DECLARED and target in relation.hints) or _single(relation.source_columns, target)


def hinted_by(relation: Relation, hint: str) -> bool:
    """Does ``target!hint(...)`` pick this relation, among those to ``target``? The junction's name for one
    through a junction; else the key's name (or ``declared``, or a merged relation's other names), or its
    column on either side when it has one. From a contract to itself, only its one-to-many side answers
    (``children:family_tree!parent(*)``)."""
    if relation.junction is not None:
        return not relation.is_self and hint == relation.junction.contract
    if relation.is_self and relation.kind != "one-to-many":
        return False
    return hint in relation.hints or _single(relation.source_columns, hint) or _single(relation.target_columns, hint)


def selects(relation: Relation, target: str, hint: str | None) -> bool:
    """Does the embed ``target`` (``target!hint``) mean this relation?"""
    if hint is None:
        return embeds_as(relation, target)
    return target == relation.target and hinted_by(relation, hint)


def distinct_hints(candidates: Sequence[Relation]) -> tuple[str, ...]:
    """For each candidate, an ``!hint`` that picks it alone among them: its own name when no other answers to it
    (the key's, or the junction's: what PostgREST suggests), else a column only it answers to, else its name
    (then nothing tells them apart: two identical ways through one junction)."""
    names = []
    for relation in candidates:
        others = [r for r in candidates if r is not relation]
        options = (*relation.hints, *relation.source_columns, *relation.target_columns)
        unique = [h for h in options if hinted_by(relation, h) and not any(hinted_by(o, h) for o in others)]
        names.append(unique[0] if unique else relation.name)
    return tuple(names)


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
    """Every relation among the contracts of one API version, by the contract they start from: foreign keys
    (in constraint name order) and declared links first, then those through a junction."""
    served = list(contracts)
    constraints = list(constraints)
    unique = {(c.schema, c.table, frozenset(c.columns)) for c in constraints if c.kind in ("p", "u")}
    exposed = {c.name: _exposed(lineages.get(c.label, {})) for c in served}
    relations: dict[str, list[Relation]] = {c.name: [] for c in served}
    many_to_one: dict[str, list[tuple[Constraint, Relation]]] = {}
    for fk in (c for c in constraints if c.kind == "f" and c.ref_table and c.ref_schema):
        assert fk.ref_schema is not None and fk.ref_table is not None
        one_to_one = (fk.schema, fk.table, frozenset(fk.columns)) in unique
        cardinality: Cardinality | None = "one-to-one" if one_to_one else None
        for many in served:
            many_columns = _columns_in(exposed[many.name], fk.schema, fk.table, fk.columns)
            if many_columns is None:
                continue
            for one in served:
                one_columns = _columns_in(exposed[one.name], fk.ref_schema, fk.ref_table, fk.ref_columns)
                if one_columns is None:
                    continue
                forward = Relation(many.name, one.name, many_columns, one_columns, True, fk.name,
                                   cardinality=cardinality)
                relations[many.name].append(forward)
                relations[one.name].append(Relation(one.name, many.name, one_columns, many_columns, one_to_one,
                                                    fk.name, cardinality=cardinality))
                if not one_to_one:
                    many_to_one.setdefault(many.name, []).append((fk, forward))
    columns = {c.name: set(c.columns) for c in served}
    for link in declared:  # only between versions that show both columns: an older one may not have them yet
        if link.source_column in columns.get(link.source, ()) and link.target_column in columns.get(link.target, ()):
            relations[link.source].append(Relation(link.source, link.target, (link.source_column,),
                                                   (link.target_column,), True, DECLARED))
            relations[link.target].append(Relation(link.target, link.source, (link.target_column,),
                                                   (link.source_column,), False, DECLARED))
    primary = {(c.schema, c.table): set(c.columns) for c in constraints if c.kind == "p"}
    for junction, keys in many_to_one.items():
        for relation in _through(junction, keys, primary):
            relations[relation.source].append(relation)
    return {name: _merged(found) for name, found in relations.items()}


def _through(junction: str, keys: Sequence[tuple[Constraint, Relation]],
             primary: Mapping[tuple[str, str], set[str]]) -> list[Relation]:
    """The many-to-many relations through one contract, from its many-to-one foreign keys: every ordered pair of
    two different keys of one table whose columns all belong to that table's primary key (PostgREST's rule)."""
    found = []
    for first, to_source in keys:
        for second, to_target in keys:
            if first.name == second.name or (first.schema, first.table) != (second.schema, second.table):
                continue
            if to_source.source_columns == to_target.source_columns:
                continue  # two identical keys: one link, not a pair
            if not {*first.columns, *second.columns} <= primary.get((first.schema, first.table), set()):
                continue
            link = Junction(junction, first.name, second.name, to_source.source_columns, to_target.source_columns)
            found.append(Relation(to_source.target, to_target.target, to_source.target_columns,
                                  to_target.target_columns, False, junction, cardinality="many-to-many",
                                  junction=link))
    return found


def _merged(relations: Iterable[Relation]) -> list[Relation]:
    """One relation per (target, columns): the first one found (a foreign key before a declared one, keys in
    name order) keeps its name and its cardinality, the others' names become its aliases. The cardinality is
    the key's because the database knows it: a declared link guesses "a list" backwards, while the key of a
    table split is unique and embeds one object."""
    kept: dict[tuple[object, ...], Relation] = {}
    for relation in relations:
        key: tuple[object, ...] = (relation.target, relation.source_columns, relation.target_columns)
        if relation.junction is not None:  # one per junction and pair of keys' columns
            j = relation.junction
            key = (*key, j.contract, j.source_columns, j.target_columns)
        first = kept.get(key)
        if first is None:
            kept[key] = relation
        elif relation.name not in first.hints:
            kept[key] = replace(first, aliases=(*first.aliases, relation.name))
    return list(kept.values())
