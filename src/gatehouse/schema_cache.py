"""What each API version looks like to the compiler: views, their column types, keys and relations.

Built once at start from the database catalog (view columns, base-table constraints) and the project
(contract lineage, declared relations); requests only read it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gatehouse.contracts.lineage import SourceColumn, column_sources
from gatehouse.contracts.relations import DeclaredRelation, Relation, build_relations, contract_keys
from gatehouse.contracts.versions import schema_name
from gatehouse.db.catalog import Constraint, ViewShape
from gatehouse.project import Project


@dataclass(frozen=True, slots=True)
class ApiSchema:
    version: int
    shapes: dict[str, ViewShape]
    """contract name → its view in this version."""
    relations: dict[str, list[Relation]] = field(default_factory=dict)
    keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    databases: dict[str, str] = field(default_factory=dict)
    """contract name → the database that serves it."""
    crosses: bool = False
    """Some relation links contracts of two databases: embeds along it are composed (``query/compose.py``)."""

    def relations_from(self, contract: str) -> list[Relation]:
        return self.relations.get(contract, [])


def declared_relations(project: Project) -> list[DeclaredRelation]:
    links = []
    for relation in project.config.relations:
        source, source_column = relation.source.split(".", 1)
        target, target_column = relation.target.split(".", 1)
        links.append(DeclaredRelation(source, source_column, target, target_column))
    return links


def build_schemas(project: Project, catalog: Mapping[tuple[str, str], ViewShape],
                  constraints: Mapping[str, Iterable[Constraint]]) -> dict[int, ApiSchema]:
    """One :class:`ApiSchema` per API version. Relations from foreign keys link contracts of one database;
    ``[[relations]]`` may also link two databases (no JOIN there: such embeds are composed, ``query/compose.py``)."""
    lineages: dict[str, dict[str, SourceColumn]] = {c.label: column_sources(c.sql) for c in project.contracts}
    declared = declared_relations(project)
    schemas: dict[int, ApiSchema] = {}
    for number, served in project.versions.served.items():
        shapes = {name: catalog[(schema_name(number), name)] for name in served}
        relations: dict[str, list[Relation]] = {}
        keys: dict[str, tuple[str, ...]] = {}
        for database in project.config.databases:
            local = [c for c in served.values() if c.database == database]
            found = list(constraints.get(database, ()))
            relations.update(build_relations(local, lineages, found, declared))
            keys.update(contract_keys(local, lineages, found))
        databases = {name: c.database for name, c in served.items()}
        across = [d for d in declared if d.source in databases and d.target in databases
                  and databases[d.source] != databases[d.target]]
        composed = build_relations(served.values(), lineages, (), across)  # (only the declared ones: no keys)
        for name, found_across in composed.items():
            relations.setdefault(name, []).extend(found_across)
        schemas[number] = ApiSchema(number, shapes, relations, keys,
                                    {name: c.description for name, c in served.items()}, databases,
                                    any(composed.values()))
    return schemas
