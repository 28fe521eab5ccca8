"""The *live* signature of each contract version: what its view would look like in this database, now.

PostgreSQL itself compiles each contract's SQL as a temporary view, inside a transaction that is always
rolled back, and its catalog gives the output columns and their types with ``format_type(atttypid,
atttypmod)`` — the same spelling as :mod:`gatehouse.db.catalog` (``numeric(10,2)``, not ``numeric``), which a
prepared statement's description cannot give (it has no type modifiers). Nothing in ``api_vN`` is touched,
so this runs against a production database as safely as against a scratch one in CI.

Nullability is *declared* (``-- not null: ...``, see :mod:`gatehouse.contracts.lockfile`) because PostgreSQL
reports every view column as nullable, and then *checked through lineage*: a declared column whose source is
a base column without ``NOT NULL``, or that comes through the nullable side of an outer join, can be null
whatever the comment says, so it comes out nullable. A promise is only ever weakened this way, never made:
a computed column, or one read from a view, keeps its declaration (PostgreSQL cannot tell more). So
``ALTER TABLE ... DROP NOT NULL`` under a released promise is a breaking change to ``migrate plan`` and
``check``, like a dropped column. Relations come from the base tables' constraints, traced through
each contract's lineage exactly as the server does (:mod:`gatehouse.contracts.relations`), per API version;
a signature records the union of a contract version's relations over the API versions that serve it (what
an app may embed somewhere), so whether an embed is ambiguous is judged per API version instead
(:mod:`gatehouse.contracts.ambiguity`).

``gatehouse lock`` needs one thing more than the signatures: a new version whose promise the tables do not
keep is refused rather than released with the column nullable (a weaker promise, recorded silently), so
:func:`live_signatures` also returns the broken promises (:class:`LiveSignatures`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import asyncpg

from gatehouse.contracts.lineage import SourceColumn, column_sources
from gatehouse.contracts.model import ContractVersion, declared_not_null
from gatehouse.contracts.relations import Relation, build_relations
from gatehouse.contracts.shape import Column, CompileError, RelationRef, Signature
from gatehouse.db import Connection
from gatehouse.db.catalog import Constraint, load_constraints
from gatehouse.db.targets import resolve_targets
from gatehouse.project import Project
from gatehouse.schema_cache import declared_relations

LOCK_TIMEOUT = "5s"
"""Creating a view takes a light lock on the tables it reads; never queue behind a long migration."""

VIEW_COLUMNS = r"""
SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS type
FROM pg_attribute a
WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

BASE_COLUMNS = r"""
SELECT t.name, a.attname::text AS column, a.attnotnull AS not_null
FROM unnest($1::text[]) AS t(name)
JOIN pg_class c ON c.oid = to_regclass(t.name)
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relkind IN ('r', 'p', 'f')
"""
"""Whether each column of the named tables is NOT NULL. Only tables (plain, partitioned, foreign) answer:
a view's columns are all nullable to PostgreSQL, so for them (or a name not found) nothing can be told."""

OUTER_JOIN = "outer join"
NULLABLE_IN_TABLE = "nullable in the table"


@dataclass(frozen=True, slots=True)
class NullablePromise:
    """A column that ``-- not null:`` promises, but that its lineage says can be null."""

    column: str
    source: SourceColumn
    reason: str
    """:data:`OUTER_JOIN` or :data:`NULLABLE_IN_TABLE`."""

    @property
    def base_column(self) -> str:
        table = f"{self.source.schema}.{self.source.table}" if self.source.schema else self.source.table
        return f"{table}.{self.source.column}"

    @property
    def why(self) -> str:
        """``comes from items.name, which is nullable in the table``."""
        if self.reason == OUTER_JOIN:
            return f"comes from {self.base_column} through the nullable side of an outer join"
        return f"comes from {self.base_column}, which is nullable in the table"

    def fix(self, where: str) -> str:
        """What to do about it; ``where`` says where the promise can be taken back (``in this file``)."""
        if self.reason == OUTER_JOIN:
            return (f"a row without a match gives null: remove {self.column} from `-- not null:` {where}, "
                    f"or make it never null in the SQL (an inner join, coalesce)")
        return (f"add NOT NULL to {self.base_column} in a migration (fill its nulls first), or remove "
                f"{self.column} from `-- not null:` {where}")


class LiveSignatures(dict[str, Signature | CompileError]):
    """label → live signature (or why it does not compile), as a plain dict, plus :attr:`promises`: the
    declared-not-null columns that can be null now, which :func:`gatehouse.contracts.lockfile.update_lock`
    refuses to release (the signature alone shows a nullable column, not that the file promised otherwise)."""

    def __init__(self) -> None:
        super().__init__()
        self.promises: dict[str, list[NullablePromise]] = {}

    def merge(self, other: LiveSignatures) -> None:
        """Add another database's signatures and promises (labels are unique across databases)."""
        self.update(other)
        self.promises.update(other.promises)


def live_labels(project: Project) -> frozenset[str]:
    """Contract versions served by at least one live API version (a retired one has no view any more)."""
    return frozenset(c.label for served in project.versions.served.values() for c in served.values())


def relations_by_api_version(project: Project, database: str,
                             constraints: Iterable[Constraint]) -> dict[int, dict[str, list[Relation]]]:
    """API version → contract version's label → its relations there, among the contracts of ``database`` that
    the version serves: what :func:`gatehouse.schema_cache.build_schemas` gives the server."""
    constraints = list(constraints)
    lineages: dict[str, dict[str, SourceColumn]] = {
        c.label: column_sources(c.sql) for c in project.contracts if c.database == database
    }
    declared = declared_relations(project)
    found: dict[int, dict[str, list[Relation]]] = {}
    for number, served in sorted(project.versions.served.items()):
        local = [c for c in served.values() if c.database == database]
        relations = build_relations(local, lineages, constraints, declared)
        found[number] = {c.label: relations.get(c.name, []) for c in local}
    return found


def relations_by_label(project: Project, database: str,
                       constraints: Iterable[Constraint]) -> dict[str, tuple[RelationRef, ...]]:
    """Each contract version's relations: the union over the API versions that serve it. Those through a
    junction are left out: they follow from the junction's own relations, which its signature records."""
    found: dict[str, set[RelationRef]] = {}
    for by_label in relations_by_api_version(project, database, constraints).values():
        for label, relations in by_label.items():
            found.setdefault(label, set()).update(
                RelationRef(r.target, r.source_columns, r.target_columns, r.to_one) for r in relations
                if r.junction is None)
    return {label: tuple(sorted(refs)) for label, refs in found.items()}


def _table_name(source: SourceColumn) -> str:
    """The table as ``to_regclass`` reads it: quoted, so the name is taken as written."""
    parts = [source.schema, source.table] if source.schema else [source.table]
    return ".".join('"' + part.replace('"', '""') + '"' for part in parts)


async def _not_null_columns(conn: Connection, tables: Iterable[str]) -> dict[str, dict[str, bool]]:
    """table (as :func:`_table_name` writes it) → column → NOT NULL, for the tables PostgreSQL can answer for."""
    found: dict[str, dict[str, bool]] = {}
    for row in await conn.fetch(BASE_COLUMNS, sorted(set(tables))):
        found.setdefault(row["name"], {})[row["column"]] = row["not_null"]
    return found


def _broken(contract: ContractVersion, lineage: Mapping[str, SourceColumn],
            not_null: Mapping[str, Mapping[str, bool]]) -> list[NullablePromise]:
    broken = []
    for column in sorted(declared_not_null(contract.sql)):
        source = lineage.get(column)
        if source is None:
            continue  # computed: nothing to trace, the declaration stands
        if source.outer:
            broken.append(NullablePromise(column, source, OUTER_JOIN))
        elif not_null.get(_table_name(source), {}).get(source.column) is False:
            broken.append(NullablePromise(column, source, NULLABLE_IN_TABLE))
    return broken


async def nullable_promises(conn: Connection,
                            contracts: Iterable[ContractVersion]) -> dict[str, list[NullablePromise]]:
    """label → the declared-not-null columns that can be null, now, in this database (one catalog query)."""
    contracts = list(contracts)
    lineages = {c.label: column_sources(c.sql) for c in contracts}
    tables = [_table_name(source) for lineage in lineages.values() for source in lineage.values()]
    not_null = await _not_null_columns(conn, tables) if tables else {}
    found = {c.label: _broken(c, lineages[c.label], not_null) for c in contracts}
    return {label: broken for label, broken in found.items() if broken}


async def _view_columns(conn: Connection, sql: str, index: int) -> list[tuple[str, str]]:
    name = f"pg_temp.gh_signature_{index}"
    await conn.execute(f"CREATE TEMP VIEW gh_signature_{index} AS\n{sql}\n")
    return [(row["name"], row["type"]) for row in await conn.fetch(VIEW_COLUMNS, name)]


def _compile_error(contract: ContractVersion, exc: asyncpg.PostgresError) -> CompileError:
    message = str(getattr(exc, "message", None) or exc)
    return CompileError(contract.name, contract.version, contract.database, message,
                        getattr(exc, "detail", None), getattr(exc, "hint", None), getattr(exc, "sqlstate", None))


def signature_of(contract: ContractVersion, columns: Sequence[tuple[str, str]],
                 relations: tuple[RelationRef, ...] = (), can_be_null: Iterable[str] = ()) -> Signature:
    """``can_be_null``: declared-not-null columns that lineage says can be null (they come out nullable)."""
    not_null = declared_not_null(contract.sql) - set(can_be_null)
    return Signature(contract.name, contract.version, contract.database,
                     tuple(Column(name, type_, name not in not_null) for name, type_ in columns), relations)


async def live_signatures(conn: Connection, project: Project, database: str) -> LiveSignatures:
    """label → signature (or why it does not compile) of every live contract version of ``database``, with
    the promises its tables do not keep."""
    live = live_labels(project)
    contracts = [c for c in project.contracts if c.database == database and c.label in live]
    relations = relations_by_label(project, database, await load_constraints(conn))
    results = LiveSignatures()
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        from gatehouse.events.mirror_tables import stand_in_mirror_tables  # (it imports the project's model)

        await stand_in_mirror_tables(conn, project, database)  # contracts over mirrors compile before apply
        promises = await nullable_promises(conn, contracts)
        results.promises.update(promises)
        for index, contract in enumerate(contracts):
            try:
                async with conn.transaction():  # a savepoint: one contract's error leaves the others alone
                    columns = await _view_columns(conn, contract.sql, index)
            except asyncpg.PostgresError as exc:
                results[contract.label] = _compile_error(contract, exc)
                continue
            broken = [p.column for p in promises.get(contract.label, [])]
            results[contract.label] = signature_of(contract, columns, relations.get(contract.label, ()), broken)
    finally:
        await transaction.rollback()
    return results


async def project_signatures(project: Project) -> LiveSignatures:
    """:func:`live_signatures` of every database of the project (what ``gatehouse lock`` records)."""
    results = LiveSignatures()
    for name, target in (await resolve_targets(project)).items():
        conn = await target.connect_owner()
        try:
            results.merge(await live_signatures(conn, project, name))
        finally:
            await conn.close()
    return results
