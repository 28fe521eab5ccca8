"""What a write decides before it touches the database (:class:`WritePlan`), and the plans of plain inserts kept
per request *shape* (:class:`WriteTemplate`), as reads keep theirs (``query/plans.py``).

A read's SQL is compiled once per query shape; a write's was compiled on every request: the grant, the
preferences, the compilers, the statement and its audit CTE, more than half of the CPU an insert costs gatehouse
(bench/README.md). An insert's statement depends on the app, the contract and version, the headers and query
string, and the *columns* of its rows, never on their values: those go in one JSON parameter, and the audit
record's values in fourteen more. So the first insert of a shape is planned in full, and later ones reuse its
plan and statement with their own rows and record put in those parameters.

Only the plainest inserts are kept: ``POST`` with a body of one set of columns, its audit record in its own
statement, no upsert, no ``missing=default`` (rows grouped by the columns they set), no ``?columns``, and an app
without row filters (whose values would come from each caller's claims). Everything else is planned in full.
The cache is emptied when the project or the catalog reloads, like the read plans.

A kept insert whose answer needs only the count of its rows (no representation, no ``Location``) also keeps the
statement that writes a whole statement group of its shape at once (``merged_sql``; each request's part of it is
its plan's ``merge``: ``db/statement_groups.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from gatehouse.contracts.model import ContractVersion
from gatehouse.db.statement_groups import Merge
from gatehouse.http.negotiate import Format, Preferences
from gatehouse.query.sql import CompiledQuery
from gatehouse.query.tree import Condition
from gatehouse.query.writes import WriteOutcome


@dataclass(slots=True, eq=False)
class WritePlan:
    """Everything a write decides before it touches the database."""

    method: str
    version: int
    contract: ContractVersion
    key: tuple[str, ...]
    fmt: Format
    prefs: Preferences
    applied: set[str]
    """The preferences the write honours, named in ``Preference-Applied`` when they were sent."""
    statement: CompiledQuery | None
    """None when the body holds nothing to write (an empty array, an empty PATCH object)."""
    output_names: list[str]
    """The representation's columns, in order (for CSV)."""
    max_affected: int | None
    known_status: int | None
    """The status when it does not depend on what the statement finds (:func:`_known_status`)."""
    audited_in_statement: bool
    """The audit record is a CTE of the statement itself, so both commit together without a transaction."""
    needs_transaction: bool
    filters: dict[str, tuple[Condition, ...]]
    """The app's row filters, claims bound (a database error about a claim's value is the token's: 403)."""
    allow: tuple[str, ...]
    """The app's methods on the contract: the ``Allow`` of a 405."""
    merge: Merge | None = None
    """How the insert may run in one statement with others of its shape waiting for the app's connections."""

    @property
    def representation(self) -> bool:
        return self.prefs.get("return") == "representation"

    @property
    def rollback(self) -> bool:
        return self.prefs.get("tx") == "rollback"

    def status(self, outcome: WriteOutcome) -> int:
        return self.known_status or _upsert_status(outcome.existing, outcome.written)

    def with_statement(self, statement: CompiledQuery, merge: Merge | None = None) -> WritePlan:
        """This plan with another statement (its template's, with one request's values), built field by field:
        ``dataclasses.replace`` looks the fields up on every call, a measurable share of a planned insert."""
        return WritePlan(self.method, self.version, self.contract, self.key, self.fmt, self.prefs, self.applied,
                         statement, self.output_names, self.max_affected, self.known_status,
                         self.audited_in_statement, self.needs_transaction, self.filters, self.allow, merge)



@dataclass(frozen=True, slots=True)
class WriteTemplate:
    """A plain insert's plan, kept for the later requests of its shape (see the module's docstring)."""

    plan: WritePlan
    columns: tuple[str, ...]
    """The columns every row of the body sets, in the body's order."""
    rows_slot: int
    """The position, among the statement's parameters, of the rows as one JSON array."""
    audit_slot: int
    """The position of the first of the audit record's parameters (``AUDIT_CTE_PARAMS`` of them, in a row)."""
    merged_sql: str | None = None
    """The statement that writes a group of such inserts at once (:class:`Merge`), when the answer needs nothing
    of the written rows but their count (no representation, no ``Location``)."""


WriteKey = tuple[str, str, int | None, str | None, str | None, str | None, str | None, str]
"""(app, contract, version in the path, Content-Profile, Accept, Prefer, Content-Type, query string)."""


def _upsert_status(existing: int | None, written: int) -> int:
    """A merging upsert answers 200 when it only updated rows that were there, else 201."""
    return 200 if existing is not None and written and existing >= written else 201


