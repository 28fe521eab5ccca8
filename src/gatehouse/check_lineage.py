"""The checks of ``gatehouse check`` that follow each contract's lineage to the base tables of its database.

* **GHC055**: a ``-- not null:`` promise the tables do not keep. The column it names comes from a base column
  without ``NOT NULL``, or through the nullable side of an outer join, so clients can get the null the
  contract promised never to send (:func:`gatehouse.contracts.signature.nullable_promises`, the same
  derivation that makes the live signature nullable, hence GHC011 for a released version).
* **GHC056**: an embed that is ambiguous. When a contract has more than one relation to the same target in
  an API version, ``select=*,target(*)`` answers 300 and clients must name one (``target!fk_name(*)``). The
  relations are built per API version exactly as the server builds them (:mod:`gatehouse.schema_cache`), so
  what passes here is what the server answers. It is an *error* when the contract version is released with a
  single relation to that target (an app's released query that worked now fails), a *warning* otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from gatehouse.check_findings import Finding
from gatehouse.contracts.lineage import SourceColumn, column_sources
from gatehouse.contracts.lockfile import Lock
from gatehouse.contracts.model import ContractVersion
from gatehouse.contracts.relations import Relation, build_relations
from gatehouse.contracts.signature import OUTER_JOIN, NullablePromise, live_labels, nullable_promises
from gatehouse.db import Connection
from gatehouse.db.catalog import Constraint, load_constraints
from gatehouse.project import Project
from gatehouse.schema_cache import declared_relations


def _file(project: Project, contract: ContractVersion) -> str:
    try:
        return contract.path.resolve().relative_to(project.root.resolve()).as_posix()
    except ValueError:
        return str(contract.path)


def _next_version(project: Project, lock: Lock | None) -> int:
    return max(lock.released_api_version if lock else 0, project.versions.newest) + 1


# --- GHC055: a promise the tables do not keep -----------------------------------------------------------


def _promise_finding(project: Project, contract: ContractVersion, promise: NullablePromise,
                     lock: Lock | None) -> Finding:
    released = lock is not None and lock.get(contract.label) is not None
    where = (f"in a new contract version ({contract.name}.v{_next_version(project, lock)}.sql)" if released
             else "in this file")
    if promise.reason == OUTER_JOIN:
        why = f"comes from {promise.base_column} through the nullable side of an outer join"
        hint = (f"a row without a match gives null: remove {promise.column} from `-- not null:` {where}, "
                f"or make it never null in the SQL (an inner join, coalesce)")
    else:
        why = f"comes from {promise.base_column}, which is nullable in the table"
        hint = (f"add NOT NULL to {promise.base_column} in a migration (fill its nulls first), or remove "
                f"{promise.column} from `-- not null:` {where}")
    return Finding("error", "GHC055", f"{contract.label}: `-- not null:` promises {promise.column}, but it can be "
                   f"null: it {why}", contract=contract.label, file=_file(project, contract), hint=hint)


# --- GHC056: an embed that is ambiguous -----------------------------------------------------------------


def ambiguous_embeds(project: Project, database: str,
                     constraints: Iterable[Constraint]) -> dict[tuple[str, str], tuple[list[Relation], list[int]]]:
    """(contract version's label, target) → its relations to the target and the API versions where they are
    more than one; each API version's relations built as :func:`gatehouse.schema_cache.build_schemas` does."""
    constraints = list(constraints)
    lineages: dict[str, dict[str, SourceColumn]] = {
        c.label: column_sources(c.sql) for c in project.contracts if c.database == database
    }
    declared = declared_relations(project)
    found: dict[tuple[str, str], tuple[list[Relation], list[int]]] = {}
    for number, served in sorted(project.versions.served.items()):
        local = [c for c in served.values() if c.database == database]
        relations = build_relations(local, lineages, constraints, declared)
        for contract in local:
            by_target: dict[str, list[Relation]] = {}
            for relation in relations.get(contract.name, []):
                by_target.setdefault(relation.target, []).append(relation)
            for target, candidates in by_target.items():
                if len(candidates) > 1:
                    found.setdefault((contract.label, target), (candidates, []))[1].append(number)
    return found


def _hint_names(candidates: Sequence[Relation]) -> list[str]:
    """An ``!hint`` that picks each relation alone: its name, else a column only it joins on."""
    names = []
    for relation in candidates:
        others = [r for r in candidates if r is not relation]
        unique = [h for h in (*relation.hints, *relation.source_columns)
                  if not any(h in (*o.hints, *o.source_columns, *o.target_columns) for o in others)]
        names.append(unique[0] if unique else relation.name)
    return names


def _ambiguity_finding(project: Project, contract: ContractVersion, target: str, candidates: Sequence[Relation],
                       api_versions: Sequence[int], lock: Lock | None) -> Finding:
    entry = lock.get(contract.label) if lock else None
    broke = entry is not None and sum(r.target == target for r in entry.signature.relations) == 1
    described = "; ".join(f"{r.name}: {','.join(r.source_columns)} → {target}({','.join(r.target_columns)})"
                          for r in candidates)
    choices = ", ".join(f"{target}!{name}(...)" for name in _hint_names(candidates))
    versions = ", ".join(f"v{n}" for n in api_versions)
    message = (f"{contract.label}: embedding {target} is ambiguous in API {versions}: {len(candidates)} "
               f"relations lead there ({described})")
    if broke:
        hint = (f"released with one relation to {target}, so an app's `select=*,{target}(*)` now answers 300: "
                f"remove the relation added since (a foreign key, or a [[relations]] entry in gatehouse.toml, "
                f"between the columns of {contract.name} and {target}); new queries can pick one: {choices}")
        return Finding("error", "GHC056", message, contract=contract.label, file=_file(project, contract),
                       hint=hint)
    return Finding("warning", "GHC056", message, contract=contract.label, file=_file(project, contract),
                   hint=f"`select=*,{target}(*)` answers 300: clients must pick one: {choices}")


# --- together -------------------------------------------------------------------------------------------


async def lineage_findings(conn: Connection, project: Project, database: str, lock: Lock | None) -> list[Finding]:
    """GHC055 and GHC056 for the live contract versions of ``database``, on the owner connection ``conn``."""
    live = live_labels(project)
    contracts: Mapping[str, ContractVersion] = {
        c.label: c for c in project.contracts if c.database == database and c.label in live
    }
    findings = [_promise_finding(project, contracts[label], promise, lock)
                for label, promises in (await nullable_promises(conn, contracts.values())).items()
                for promise in promises]
    for (label, target), (candidates, numbers) in ambiguous_embeds(project, database,
                                                                   await load_constraints(conn)).items():
        findings.append(_ambiguity_finding(project, contracts[label], target, candidates, numbers, lock))
    return findings

