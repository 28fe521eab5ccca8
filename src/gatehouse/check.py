"""``gatehouse check``: everything that would break an application, found before it ships (made for CI).

The check reads the project folder, ``contracts.lock`` and each database (which it never changes: contracts
are compiled as temporary views in a transaction that is rolled back). Run it after ``gatehouse migrate``,
in CI against a scratch database, so contracts are compiled against the migrated schema. Every finding
says what is wrong, where, and what to do; any *error* fails the build (:func:`exit_code`).

======  =======  ===================================================================================
code    level    finding
======  =======  ===================================================================================
GHC001  error    the project does not load (the loader's message)
GHC002  error    a contract file is not a valid contract
GHC003  error    ``SELECT *`` in a contract
GHC010  error    a released contract version's file changed (checksum differs from the lock)
GHC011  error    a released contract version's signature changed incompatibly (one per change)
GHC012  warning  a released contract version's signature changed compatibly; the lock is stale
GHC013  error    a released contract version's file is gone while an API version still serves it
GHC014  error    the lock names a checksum algorithm this gatehouse does not know
GHC020  error    a new contract version is numbered at or below the newest released API version
GHC030  error    a contract reads a table of another database
GHC040  error    a contract does not compile against the database (PostgreSQL's message)
GHC041  error    migrations are pending: contracts were not compiled against the migrated schema
GHC042  error    a database cannot be reached
GHC043  error    the migration history disagrees with the migration files
GHC050  error    a grant names an unknown contract
GHC051  error    a grant's row filter cannot be read or names an unknown column
GHC052  error    a ``[[relations]]`` entry names an unknown contract or column
GHC053  error    ``[contracts.x]`` configures an unknown contract
GHC054  error    ``-- not null:`` names an unknown column
GHC055  error    ``-- not null:`` promises a column that can be null (a nullable base column, an outer join)
GHC056  error    a released contract version's embed became ambiguous (more than one relation to a target)
GHC056  warning  an embed is ambiguous in a served API version: clients must name the relation (``!hint``)
GHC060  warning  no ``contracts.lock``: nothing is released yet
GHC061  error    ``contracts.lock`` cannot be read
======  =======  ===================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import asyncpg
from sqlglot.errors import SqlglotError

from gatehouse.check_config import config_findings
from gatehouse.check_findings import Finding, error, ordered
from gatehouse.check_lineage import lineage_findings
from gatehouse.config import ProjectConfig, load_config
from gatehouse.contracts.compat import compare
from gatehouse.contracts.lockfile import (
    CHECKSUM_ALGORITHMS,
    LOCK_FILE,
    Lock,
    file_checksum,
    read_lock,
)
from gatehouse.contracts.model import ContractVersion, check_not_null, load_contract_file
from gatehouse.contracts.reads import columns_read, projection_stars, tables_read
from gatehouse.contracts.shape import CompileError, Signature
from gatehouse.contracts.signature import live_labels, live_signatures
from gatehouse.db.targets import resolve_targets
from gatehouse.errors import DatabaseUnavailable, ProjectError
from gatehouse.migrate.runner import status as migration_status
from gatehouse.project import CONFIG_FILE, Project, load_project

TABLES = r"""
SELECT n.nspname AS schema, c.relname AS table,
       array_agg(a.attname::text ORDER BY a.attnum) FILTER (WHERE a.attname IS NOT NULL) AS columns
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND n.nspname <> 'information_schema'
  AND n.nspname !~ '^pg_' AND n.nspname !~ '^api_v[0-9]+$'
GROUP BY n.nspname, c.relname
"""


def _rel(root: Path, path: Path | str) -> str:
    """A path for messages: relative to the project folder when inside it."""
    try:
        return Path(path).resolve().relative_to(root).as_posix() if Path(path).is_absolute() else str(path)
    except ValueError:
        return str(path)


# --- the project folder, without a database -------------------------------------------------------------


def _scan_contracts(root: Path, config: ProjectConfig, findings: list[Finding]) -> list[ContractVersion]:
    """Each contract file on its own, so one bad file is one finding and does not hide the others."""
    databases, base = list(config.databases), root / "contracts"
    if len(databases) == 1:  # misplaced files are the loader's to explain (GHC001)
        files = [(path, databases[0]) for path in sorted(base.glob("*.sql"))]
    else:
        files = [(path, path.parent.name) for path in sorted(base.glob("*/*.sql")) if path.parent.name in databases]
    contracts: list[ContractVersion] = []
    for path, database in files:
        file = _rel(root, path)
        try:
            stars = projection_stars(path.read_text(encoding="utf-8"))
        except SqlglotError:  # load_contract_file explains it below
            stars = []
        if stars:
            findings.append(error("GHC003", f"SELECT * in a contract ({', '.join(stars)})", file=file,
                                  hint="list the columns explicitly, so a new table column never leaks into "
                                        "the API"))
            continue
        try:
            contract = load_contract_file(path, database)
        except ProjectError as exc:
            findings.append(error("GHC002", str(exc.args[0]), file=file, hint=exc.hint))
            continue
        findings += _not_null_findings(contract, file)
        contracts.append(contract)
    return contracts


def _not_null_findings(contract: ContractVersion, file: str) -> list[Finding]:
    try:
        check_not_null(contract.sql, contract.columns, where=file)
    except ProjectError as exc:
        return [error("GHC054", str(exc.args[0]), contract=contract.label, file=file, hint=exc.hint)]
    return []


def load_for_check(root: Path, findings: list[Finding]) -> Project | None:
    """Load the project, turning every mistake into findings instead of stopping at the first."""
    root = root.resolve()
    try:
        config = load_config(root / CONFIG_FILE)
    except ProjectError as exc:
        findings.append(error("GHC001", str(exc.args[0]), file=_rel(root, exc.where or CONFIG_FILE), hint=exc.hint))
        return None
    contracts = _scan_contracts(root, config, findings)
    findings += config_findings(config, contracts)
    try:
        return load_project(root)
    except ProjectError as exc:
        if not any(f.severity == "error" for f in findings):  # else it is one of those, said again
            findings.append(error("GHC001", str(exc.args[0]), file=_rel(root, exc.where) if exc.where else None,
                                  hint=exc.hint))
        return None


# --- the databases --------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Database:
    name: str
    actual_name: str
    tables: dict[tuple[str, str], list[str]]
    signatures: dict[str, Signature | CompileError]
    pending: bool = False
    """Migrations are pending (GHC041): what a contract misses may be what they add."""


async def _migration_findings(conn: asyncpg.Connection, project: Project, database: str) -> list[Finding]:
    """Contracts must be compiled against the migrated schema: pending migrations make the check meaningless."""
    try:
        rows = await migration_status(conn, project.migrations_dir(database))
    except ProjectError as exc:
        return [error("GHC043", str(exc.args[0]), file=_rel(project.root, exc.where) if exc.where else None,
                      hint=exc.hint)]
    findings = []
    waiting = [row for row in rows if row.state == "pending" or (row.kind == "repeatable" and row.state == "changed")]
    pending = [row.script or row.label for row in waiting]
    if pending:
        findings.append(error(
            "GHC041", f"database {database}: {len(pending)} migration(s) not applied ({', '.join(pending)}), so "
                      "contracts were compiled against the schema before them",
            hint="run `gatehouse migrate` first (in CI, against a scratch database)"))
    for row in rows:
        if row.state in ("changed", "missing", "failed") and row not in waiting:
            findings.append(error("GHC043", f"database {database}: migration {row.label} is {row.state}: {row.note}",
                                  file=f"{_rel(project.root, project.migrations_dir(database))}/{row.script}"
                                  if row.script else None, hint="see `gatehouse migrate status`"))
    return findings


async def _inspect(project: Project, findings: list[Finding], lock: Lock | None) -> dict[str, _Database]:
    try:
        targets = await resolve_targets(project)
    except (ProjectError, DatabaseUnavailable) as exc:
        findings.append(error("GHC042", f"cannot reach the databases: {exc}"))
        return {}
    databases: dict[str, _Database] = {}
    for name, target in targets.items():
        try:
            conn = await target.connect_owner()
        except DatabaseUnavailable as exc:
            findings.append(error("GHC042", str(exc), hint="start it, or set its URL (see gatehouse.toml)"))
            continue
        try:
            found = await _migration_findings(conn, project, name)
            findings += found
            tables = {(r["schema"], r["table"]): list(r["columns"] or []) for r in await conn.fetch(TABLES)}
            signatures = await live_signatures(conn, project, name)
            findings += await lineage_findings(conn, project, name, lock, signatures)
            databases[name] = _Database(name, await conn.fetchval("SELECT current_database()"), tables, signatures,
                                        pending=any(f.code == "GHC041" for f in found))
        except asyncpg.PostgresError as exc:
            findings.append(error("GHC042", f"database {name}: the check could not read it: {exc}"))
        finally:
            await conn.close()
    return databases


def _cross_database(project: Project, contract: ContractVersion,
                    databases: dict[str, _Database]) -> list[Finding]:
    here = databases[contract.database]
    by_actual = {db.actual_name: db.name for db in databases.values()}
    findings = []
    for ref in sorted(tables_read(contract.sql)):
        if ref.catalog and ref.catalog != here.actual_name:
            other = by_actual.get(ref.catalog, ref.catalog)
        else:
            key = (ref.schema or "public", ref.table)
            owners = [db.name for db in databases.values() if db.name != here.name and key in db.tables]
            if key in here.tables or not owners:
                continue
            other = owners[0]
        findings.append(error(
            "GHC030", f"{contract.label} reads {ref}, a table of database {other}, from database {here.name}",
            contract=contract.label, file=_rel(project.root, contract.path),
            hint=f"a contract reads only its own database's tables; move it to contracts/{other}/, or expose "
                 f"the data in {here.name}"))
    return findings


def _compile_finding(project: Project, contract: ContractVersion, failure: CompileError, db: _Database) -> Finding:
    schema: dict[str, dict[str, list[str]]] = {}
    for (schema_name, table), columns in db.tables.items():
        schema.setdefault(schema_name, {})[table] = columns
    missing_tables = sorted(str(t) for t in tables_read(contract.sql)
                            if (t.schema or "public", t.table) not in db.tables and not t.catalog)
    missing_columns = sorted(str(c) for c in columns_read(contract.sql, schema)
                             if (c.schema or "public", c.table) in db.tables
                             and c.column not in db.tables[(c.schema or "public", c.table)])
    hints = [f"it reads {', '.join(missing_tables)}, which the database does not have"] if missing_tables else []
    if missing_columns and db.pending:
        hints.append(f"it reads {', '.join(missing_columns)}, which the database does not have yet: if a pending "
                     "migration adds it, run `gatehouse migrate` first (GHC041)")
    elif missing_columns:
        hints.append(f"it reads {', '.join(missing_columns)}, which no longer exist(s): dropped or renamed by a "
                     "migration? Keep the old column (expand, then contract) or retire this version")
    if failure.hint:
        hints.append(f"PostgreSQL: {failure.hint}")
    message = f"{contract.label} does not compile in database {db.name}: {failure.message}"
    return error("GHC040", message, contract=contract.label, file=_rel(project.root, contract.path),
                 hint="; ".join(hints) or None)


# --- the lock -------------------------------------------------------------------------------------------


def _still_served(project: Project, lock: Lock, name: str, version: int) -> bool:
    """Would a live API version serve ``name`` at ``version`` (whose file is gone)?"""
    numbers = {e.signature.version for e in lock.entries if e.signature.contract == name}
    numbers |= {c.version for c in project.contracts if c.name == name}
    later = [n for n in numbers if n > version]
    newest = max(lock.released_api_version, project.versions.newest)
    last = min(later) - 1 if later else newest
    return any(n not in project.versions.retired for n in range(version, last + 1))


def _lock_findings(project: Project, lock: Lock, databases: dict[str, _Database]) -> list[Finding]:
    findings: list[Finding] = []
    contracts = {c.label: c for c in project.contracts}
    live = live_labels(project)
    next_version = max(lock.released_api_version, project.versions.newest) + 1
    for entry in lock.entries:
        label, contract = entry.label, contracts.get(entry.label)
        if contract is None:
            if _still_served(project, lock, entry.signature.contract, entry.signature.version):
                findings.append(error("GHC013", f"{label} is released but its file {entry.file} is gone",
                                      contract=label, file=entry.file,
                                      hint="restore it; to end a version, retire its API versions first "
                                            "([versions.vN] status = \"retired\")"))
            continue
        if label not in live:
            continue  # retired: no view, nothing to keep compatible
        file = _rel(project.root, contract.path)
        if entry.checksum.algorithm not in CHECKSUM_ALGORITHMS:
            findings.append(error("GHC014", f"{LOCK_FILE} checks {label} with {entry.checksum.algorithm!r}, "
                                  "which this gatehouse does not know", contract=label, file=LOCK_FILE,
                                  hint="upgrade gatehouse"))
        file_changed = (entry.checksum.algorithm in CHECKSUM_ALGORITHMS
                        and file_checksum(contract.path, entry.checksum.algorithm) != entry.checksum)
        if file_changed:
            findings.append(error("GHC010", f"{label} was released, but its file changed since", contract=label,
                                  file=file, hint=f"a released version never changes: restore it (git checkout "
                                                   f"-- {file}) and make the change a new version, "
                                                   f"{contract.name}.v{next_version}.sql"))
        signature = databases[contract.database].signatures.get(label) if contract.database in databases else None
        if signature is None or isinstance(signature, CompileError):
            continue  # not checked (database unreachable) or GHC040 already says why
        for change in compare(entry.signature, signature):
            if change.breaking:
                findings.append(error("GHC011", f"{label}: breaking change: {change.detail}", contract=label,
                                      file=file, hint="released contract versions must stay compatible: undo the "
                                                       "change (in the contract or the migration) or add a new "
                                                       "contract version"))
            else:
                findings.append(Finding("warning", "GHC012", f"{label}: compatible change: {change.detail}",
                                        contract=label, file=file,
                                        hint="part of the file's change (GHC010)" if file_changed
                                        else "record it with `gatehouse lock`"))
    released = lock.released_api_version
    for label, contract in sorted(contracts.items()):
        if label in live and lock.get(label) is None and contract.version <= released:
            findings.append(error(
                "GHC020", f"{label} is new, but API v{released} is already released: it would change released "
                          f"API versions v{contract.version}..v{released}", contract=label,
                file=_rel(project.root, contract.path),
                hint=f"number it above the newest released API version: {contract.name}.v{released + 1}.sql"))
    return findings


# --- all together ---------------------------------------------------------------------------------------


async def run_check(project: Project | Path) -> list[Finding]:
    """Every finding for the project (a folder is loaded here, so load errors become findings too)."""
    findings: list[Finding] = []
    if isinstance(project, Path):
        loaded = load_for_check(project, findings)
        if loaded is None:
            return ordered(findings)
        project = loaded
    else:
        for contract in project.contracts:
            findings += _not_null_findings(contract, _rel(project.root, contract.path))
        findings += config_findings(project.config, list(project.contracts))
    try:
        lock = read_lock(project.root)
    except ProjectError as exc:
        findings.append(error("GHC061", str(exc.args[0]), file=LOCK_FILE, hint=exc.hint))
        lock = None
    else:
        if lock is None:
            findings.append(Finding("warning", "GHC060", f"no {LOCK_FILE}: no contract version is released yet",
                                    hint="run `gatehouse lock` when you release, and commit the file"))
    databases = await _inspect(project, findings, lock)
    live = live_labels(project)
    for contract in project.contracts:
        db = databases.get(contract.database)
        if db is None or contract.label not in live:
            continue
        findings += _cross_database(project, contract, databases)
        signature = db.signatures.get(contract.label)
        if isinstance(signature, CompileError):
            findings.append(_compile_finding(project, contract, signature, db))
    if lock is not None:
        findings += _lock_findings(project, lock, databases)
    return ordered(findings)
