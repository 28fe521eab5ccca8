"""What a client of a contract version can rely on: its :class:`Signature` (columns, relations), or the
:class:`CompileError` that says why the database cannot serve it.

The plain types shared by the lockfile (which records signatures), the compatibility rules (which compare
them) and the signature reader (which takes them from a live database); none of those import each other's
types, so the imports point one way: ``shape`` ← ``compat`` ← ``lockfile``, and ``shape`` ← ``signature``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str
    """As PostgreSQL's ``format_type`` writes it: ``bigint``, ``numeric(10,2)``, ``character varying(80)``."""
    nullable: bool


@dataclass(frozen=True, slots=True, order=True)
class RelationRef:
    """An embedding the contract offers: ``select=...,target(...)`` gives one object when ``to_one``."""

    target: str
    columns: tuple[str, ...]
    target_columns: tuple[str, ...]
    to_one: bool


@dataclass(frozen=True, slots=True)
class Signature:
    """What a client of a contract version can rely on: its columns (in order) and its relations."""

    contract: str
    version: int
    database: str
    columns: tuple[Column, ...]
    relations: tuple[RelationRef, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.contract}.v{self.version}"

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)


@dataclass(frozen=True, slots=True)
class CompileError:
    """A contract version PostgreSQL cannot compile in this database, with PostgreSQL's own words."""

    contract: str
    version: int
    database: str
    message: str
    detail: str | None = None
    hint: str | None = None
    sqlstate: str | None = None

    @property
    def label(self) -> str:
        return f"{self.contract}.v{self.version}"
