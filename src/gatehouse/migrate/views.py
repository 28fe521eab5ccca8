"""Gatehouse's contract views stay standing through a migration: no window in which an app gets a 404.

PostgreSQL refuses to change a column's type, drop a column or drop a table while a view depends on it, and
every contract view in ``api_vN`` depends on its base tables. So a migration that changes what a contract
reads would fail, or a team would drop gatehouse's views by hand and leave the API missing until the next
``apply``. Instead, :class:`ViewKeeper` runs the migration inside its transaction like this:

1. the whole file at once, in a savepoint (the common case: nothing it does touches a contract view);
2. if PostgreSQL refuses because one of *gatehouse's* views depends on what a statement changes, the file
   again, statement by statement, each in a savepoint; a statement refused that way has the views that
   PostgreSQL named dropped (their definition, comment and privileges remembered) and is run again;
3. then every view of gatehouse's that is missing (dropped in step 2, or by the migration itself, a
   ``DROP ... CASCADE`` or an old-style ``DROP VIEW api_v1.x``) is created again, from its contract's SQL
   as the project has it now (so it is compiled against the migrated tables), with its comment and
   privileges, still in the same transaction.

Readers of a dropped view wait for the migration's lock, exactly as they wait for its ``ALTER TABLE``, and
then find the view again: PostgreSQL looks a name up again after waiting for a lock on a dropped object.
If a contract does not compile against the migrated tables, the migration is refused as a whole, with the
contract versions and the apps that use them named, and nothing of it is applied.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import asyncpg

from gatehouse.contracts.versions import schema_name
from gatehouse.db import quote_ident
from gatehouse.db.sync import qualified
from gatehouse.errors import ProjectError
from gatehouse.migrate.statements import Statement, split_statements
from gatehouse.observe.usage import affected_apps
from gatehouse.project import Project

DEPENDENCY_SQLSTATES = {"2BP01", "0A000"}
"""dependent_objects_still_exist (DROP COLUMN / TABLE) and feature_not_supported (ALTER COLUMN TYPE)."""
_NAME = r'(?:"(?:[^"]|"")+"|[^\s."]+)'
NAMED_VIEW = re.compile(rf"\bview ({_NAME}(?:\.{_NAME})?) depends on")
"""How PostgreSQL's DETAIL names a dependent view: ``view api_v1.products depends on column price ...``."""
API_SCHEMA = re.compile(r"^api_v[1-9][0-9]*$")

SAVED_VIEW = r"""
SELECT n.nspname AS schema, c.relname AS name, pg_get_viewdef(c.oid) AS definition,
       obj_description(c.oid, 'pg_class') AS comment,
       coalesce(array_agg(ARRAY[g.rolname::text, a.privilege_type]) FILTER (WHERE g.rolname IS NOT NULL),
                '{}') AS grants
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN LATERAL aclexplode(c.relacl) a ON a.grantee <> c.relowner
LEFT JOIN pg_roles g ON g.oid = a.grantee
JOIN gatehouse.views v ON v.schema_name = n.nspname AND v.view_name = c.relname
WHERE c.relkind = 'v' AND n.nspname ~ '^api_v[0-9]+$'
GROUP BY n.nspname, c.relname, c.oid
ORDER BY n.nspname, c.relname
"""


@dataclass(frozen=True, slots=True)
class SavedView:
    schema: str
    name: str
    definition: str
    comment: str | None
    grants: tuple[tuple[str, str], ...]
    """(role, privilege) as they were, re-granted as they were."""


class StatementFailed(Exception):
    """A statement of a migration run one at a time failed; the runner reports its line."""

    def __init__(self, statement: Statement, error: asyncpg.PostgresError) -> None:
        super().__init__(error.message)
        self.statement, self.error = statement, error


class ContractsWouldBreak(ProjectError):
    """After the migration, contract views cannot be created again: the migration is refused as a whole."""

    def __init__(self, migration: str, failures: list[tuple[str, str]], users: dict[str, list[str]], *,
                 pinned: bool) -> None:
        self.migration = migration
        self.failures = failures
        """(contract version's label, PostgreSQL's reason), one per label."""
        self.users = users
        """label → the apps pinned to its API versions (``pinned``), else the apps granted its contract."""
        said = "pinned to it" if pinned else "granted it"
        lines = "".join(f"\n  {label}: {reason}" + (f" ({said}: {', '.join(users[label])})" if users.get(label)
                                                    else f" (no app {said})") for label, reason in failures)
        apps = sorted({app for label, _ in failures for app in users.get(label, [])})
        super().__init__(
            f"migration {migration} was not applied: after it, {len(failures)} contract version(s) the API serves "
            f"could not be created again (nothing of it stays; migrations before it did apply):{lines}",
            hint=(f"Apps that would break: {', '.join(apps)}. " if apps else "")
            + "Keep what these versions read (expand → migrate → contract, docs/safe-schema-changes.md): add "
              "the new shape in a new contract version, move the apps, retire the old version (`gatehouse "
              "apply`), then change the tables. Not even --force ships this: the API would lose these versions",
        )


@dataclass
class ViewKeeper:
    """Runs one database's migrations so that the project's contract views are never missing."""

    project: Project
    database: str
    strict: bool = True
    """False in ``migrate plan``: a view that cannot be created again is left out (the plan reports its
    contract as no longer compiling) instead of refusing the migration. ``migrate`` is always strict, even
    forced: ``--force`` ships a change that breaks a promise (a type, a nullability), never one that takes a
    served version away."""
    on_restored: Callable[[str, list[str]], None] | None = None
    """Told, after a migration that needed it, the migration's label and the views it created again."""
    restored: list[str] = field(default_factory=list)
    """What the last :meth:`run` created again (``api_v1.products``)."""

    async def run(self, conn: asyncpg.Connection, sql: str, label: str = "") -> None:
        """Run a migration's SQL inside the caller's transaction, views kept (see the module docstring)."""
        before = await _saved_views(conn)
        try:
            async with conn.transaction():
                await conn.execute(sql)
        except asyncpg.PostgresError as exc:
            if not self._blocking(exc, set(before)):
                raise
            for statement in split_statements(sql):
                await self._run_statement(conn, statement, set(before))
        standing = {(r["schemaname"], r["viewname"]) for r in await conn.fetch(
            r"SELECT schemaname, viewname FROM pg_views WHERE schemaname ~ '^api_v[0-9]+$'")}
        await self._restore(conn, [view for key, view in before.items() if key not in standing], label)
        if self.restored and self.on_restored is not None:
            self.on_restored(label, list(self.restored))

    async def _run_statement(self, conn: asyncpg.Connection, statement: Statement,
                             ours: set[tuple[str, str]]) -> None:
        while True:
            try:
                async with conn.transaction():
                    await conn.execute(statement.sql)
                return
            except asyncpg.PostgresError as exc:
                views = self._blocking(exc, ours)
                if not views:
                    raise StatementFailed(statement, exc) from exc
                for view in views:
                    await conn.execute(f"DROP VIEW {qualified(*view)}")

    @staticmethod
    def _blocking(exc: asyncpg.PostgresError, ours: set[tuple[str, str]]) -> list[tuple[str, str]]:
        """Which of gatehouse's views (``ours``, as they stood before the migration) PostgreSQL says stand in
        the way (none for any other error)."""
        if exc.sqlstate not in DEPENDENCY_SQLSTATES:
            return []
        named = [_split_name(match) for match in NAMED_VIEW.findall(exc.detail or "")]
        if not named:
            return []
        found: list[tuple[str, str]] = []
        for schema, name in named:
            candidates = [(schema, name)] if schema else sorted(v for v in ours if v[1] == name)
            found += [v for v in candidates if v in ours and API_SCHEMA.match(v[0]) and v not in found]
        return found

    def _contract_sql(self, view: SavedView) -> tuple[str, str | None]:
        """The SQL to create ``view`` from, and the contract's checksum (None: the project no longer serves
        it, so it is made again as it was)."""
        for number, contract in self.project.versions.views():
            if contract.database == self.database and (schema_name(number), contract.name) == (view.schema,
                                                                                                view.name):
                return contract.sql, contract.checksum
        return view.definition, None

    async def _restore(self, conn: asyncpg.Connection, missing: list[SavedView], label: str) -> None:
        failures: dict[str, str] = {}  # one line per contract version, however many API versions serve it
        self.restored = []
        for view in missing:
            sql, checksum = self._contract_sql(view)
            try:
                async with conn.transaction():
                    await _create(conn, view, sql, checksum)
                self.restored.append(f"{view.schema}.{view.name}")
            except asyncpg.PostgresError as exc:
                failures.setdefault(_label(self.project, view), exc.message)
        if failures and self.strict:
            raise ContractsWouldBreak(label, list(failures.items()), self._granted(failures), pinned=False)

    def _granted(self, labels: Iterable[str]) -> dict[str, list[str]]:
        """The apps granted each contract version's contract (who could lose it)."""
        users: dict[str, list[str]] = {}
        for label in labels:
            contract = label.rpartition(".v")[0]
            users[label] = sorted(app.name for app in self.project.apps.values() if app.grant_for(contract))
        return users

    async def explained(self, conn: asyncpg.Connection, refused: ContractsWouldBreak) -> ContractsWouldBreak:
        """``refused`` naming the apps *pinned* to the broken versions (from the audit's usage), read after the
        migration's rollback so that the read holds none of its locks; as it was if usage cannot be read."""
        pinned: dict[str, list[str]] = {}
        try:
            for label, _ in refused.failures:
                versions = tuple(n for n, c in self.project.versions.views() if c.label == label)
                uses = await affected_apps(conn, label.rpartition(".v")[0], versions)
                pinned[label] = sorted(use.app for use in uses if use.pinned)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            return refused
        if not any(pinned.values()):  # nobody called them lately: who *could* is the useful answer
            return refused
        explained = ContractsWouldBreak(refused.migration, refused.failures, pinned, pinned=True)
        explained.__cause__ = refused.__cause__
        return explained


async def _saved_views(conn: asyncpg.Connection) -> dict[tuple[str, str], SavedView]:
    """Every view of gatehouse's in this database, as it stands (none before the first ``apply``)."""
    if not await conn.fetchval("SELECT to_regclass('gatehouse.views') IS NOT NULL"):
        return {}
    return {(r["schema"], r["name"]): SavedView(r["schema"], r["name"], r["definition"], r["comment"],
                                                tuple((role, privilege) for role, privilege in r["grants"]))
            for r in await conn.fetch(SAVED_VIEW)}


async def _create(conn: asyncpg.Connection, view: SavedView, sql: str, checksum: str | None) -> None:
    name = qualified(view.schema, view.name)
    await conn.execute(f"CREATE VIEW {name} AS\n{sql}\n")
    if view.comment is not None:
        await conn.execute(f"COMMENT ON VIEW {name} IS " + "'" + view.comment.replace("'", "''") + "'")
    for role, privilege in view.grants:
        await conn.execute(f"GRANT {privilege} ON {name} TO {quote_ident(role)}")
    if checksum is not None:
        await conn.execute("UPDATE gatehouse.views SET checksum = $3 WHERE schema_name = $1 AND view_name = $2",
                           view.schema, view.name, checksum)


def _label(project: Project, view: SavedView) -> str:
    number = int(view.schema.removeprefix("api_v"))
    contract = project.versions.served.get(number, {}).get(view.name)
    return contract.label if contract is not None else f"{view.schema}.{view.name}"


def _split_name(text: str) -> tuple[str | None, str]:
    parts = re.findall(r"\"((?:[^\"]|\"\")+)\"|([^.\"]+)", text)
    names = [quoted.replace('""', '"') if quoted else plain for quoted, plain in parts]
    return (names[0], names[1]) if len(names) == 2 else (None, names[-1])
