"""Load a project folder into one immutable :class:`Project`.

A project is ``gatehouse.toml``, ``contracts/`` and ``migrations/``. Everything is validated here, at load,
and every mistake names its file and key and says what to do: the server never starts on a project that
does not hold together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gatehouse.config import AppConfig, ProjectConfig, load_config
from gatehouse.contracts.model import ContractVersion, load_contract_file
from gatehouse.contracts.versions import ApiVersions, carry_forward
from gatehouse.errors import ApiError, ProjectError
from gatehouse.events.mirror_plan import check_mirrors
from gatehouse.logic.registry import LogicFunction, import_logic, published_functions
from gatehouse.query.row_filters import columns_of, parse_row_filter
from gatehouse.query.tree import Condition
from gatehouse.sagas.declare import SagaCatalog, collect_sagas

CONFIG_FILE = "gatehouse.toml"
_NO_ACTIONS: frozenset[str] = frozenset()
STATE_DIR = ".gatehouse"


@dataclass(frozen=True, slots=True)
class App:
    name: str
    config: AppConfig
    role: str
    """The NOLOGIN PostgreSQL role this app's queries run under."""
    row_filters: dict[str, tuple[Condition, ...]] = field(default_factory=dict)
    """contract → its grant's row filter, parsed (claims still as ``{claims.x}`` placeholders)."""
    readable: dict[int, frozenset[str]] = field(default_factory=dict, compare=False)
    """API version → the contracts this app may read in it; filled by ``access.readable_contracts``."""
    _grants: dict[str, frozenset[str]] = field(default_factory=dict, compare=False)

    def grant_for(self, contract: str) -> frozenset[str]:
        if not self._grants and self.config.grants:  # once: this is asked on every request
            self._grants.update((g.contract, frozenset(g.actions)) for g in self.config.grants)
        return self._grants.get(contract, _NO_ACTIONS)


@dataclass(frozen=True, slots=True)
class Project:
    root: Path
    config: ProjectConfig
    contracts: tuple[ContractVersion, ...]
    versions: ApiVersions
    apps: dict[str, App] = field(default_factory=dict)
    functions: dict[str, LogicFunction] = field(default_factory=dict)
    """The published logic functions of ``logic/``, by name."""
    sagas: SagaCatalog = field(default_factory=SagaCatalog)
    """The sagas and saga steps of ``logic/`` (``gatehouse.sagas``)."""

    @property
    def name(self) -> str:
        return self.config.project.name

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR

    @property
    def role_prefix(self) -> str:
        """Roles are cluster-wide in PostgreSQL, so they carry the project's name."""
        return f"gh_{self.name}_"

    @property
    def authenticator_role(self) -> str:
        return f"{self.role_prefix}authenticator"

    @property
    def home_database(self) -> str:
        """The database that holds gatehouse's own tables (keys): the first one declared."""
        return next(iter(self.config.databases))

    @property
    def default_version(self) -> int:
        return self.config.project.default_version or self.versions.newest

    def max_rows(self, app: App, contract: str) -> int:
        """Rows per response: the contract's setting (else the server's default), capped by the app's quota."""
        settings = self.config.contracts.get(contract)
        base = settings.max_rows if settings and settings.max_rows else self.config.server.max_rows
        quota = app.config.quota.max_rows
        return base if quota is None else min(base, quota)

    def database_of(self, contract: str) -> str | None:
        for version in self.contracts:
            if version.name == contract:
                return version.database
        return None

    def databases_of_apps(self) -> dict[str, set[str]]:
        """Each app's databases: those of its grants and functions, and every saga database (a saga's local
        steps run as its app). An app has a pool on each."""
        result: dict[str, set[str]] = {}
        saga_databases = self.sagas.databases(self.home_database)
        for app in self.apps.values():
            dbs = {self.database_of(g.contract) for g in app.config.grants}
            dbs |= {self.functions[f].database or self.home_database for f in app.config.functions}
            dbs |= saga_databases
            result[app.name] = {db for db in dbs if db is not None}
        return result

    def migrations_dir(self, database: str) -> Path:
        base = self.root / "migrations"
        return base / database if len(self.config.databases) > 1 else base


def _contract_files(root: Path, databases: list[str]) -> list[tuple[Path, str]]:
    base = root / "contracts"
    if not base.is_dir():
        return []
    if len(databases) == 1:
        stray = [p for p in base.iterdir() if p.is_dir()]
        if stray:
            raise ProjectError(f"found a folder {stray[0].name}/ but the project has one database",
                               where=str(base), hint="with one database, contract files sit in contracts/")
        return [(path, databases[0]) for path in sorted(base.glob("*.sql"))]
    loose = sorted(base.glob("*.sql"))
    if loose:
        raise ProjectError(
            "with several databases, each contract lives in contracts/<database>/",
            where=str(loose[0]), hint=f"move it into contracts/<database>/, one of: {', '.join(databases)}",
        )
    files: list[tuple[Path, str]] = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir()):
        if folder.name not in databases:
            raise ProjectError(f"no database named {folder.name!r} in gatehouse.toml", where=str(folder),
                               hint=f"declared databases: {', '.join(databases)}")
        files.extend((path, folder.name) for path in sorted(folder.glob("*.sql")))
    return files


def _check_unique(contracts: list[ContractVersion]) -> None:
    seen: dict[tuple[str, int], ContractVersion] = {}
    homes: dict[str, str] = {}
    for contract in contracts:
        key = (contract.name, contract.version)
        if key in seen:
            raise ProjectError(f"{contract.label} is defined twice (also in {seen[key].path})",
                               where=str(contract.path))
        seen[key] = contract
        home = homes.setdefault(contract.name, contract.database)
        if home != contract.database:
            raise ProjectError(
                f"contract {contract.name!r} exists in two databases ({home}, {contract.database})",
                where=str(contract.path), hint="contract names are the URL path, so they are unique per project",
            )


def _check_apps(config: ProjectConfig, versions: ApiVersions, where: str) -> None:
    known = {name for served in versions.served.values() for name in served}
    newest = versions.newest
    if config.project.default_version in versions.retired:
        live = ", ".join(f"v{n}" for n in versions.numbers) or "none"
        raise ProjectError(f"project.default_version = {config.project.default_version}: that version is retired",
                           where=where, hint=f"point it at a live version ({live})")
    for name, app in config.apps.items():
        if app.version in versions.retired:
            raise ProjectError(f"apps.{name}.version = {app.version}: the app is pinned to v{app.version}, "
                               "which is retired", where=where,
                               hint=f"move the app to a live version (e.g. version = {newest}) before retiring")
    if config.project.default_version and config.project.default_version > newest:
        raise ProjectError(f"project.default_version = {config.project.default_version}, but the newest "
                           f"API version is v{newest}", where=where,
                           hint=f"use a version from 1 to {newest}, or add contract files numbered "
                                f"v{config.project.default_version} (contracts/<name>.v<N>.sql)")
    for name, app in config.apps.items():
        if app.version is not None and app.version > newest:
            raise ProjectError(f"apps.{name}.version = {app.version}, but the newest API version is v{newest}",
                               where=where, hint=f"use a version from 1 to {newest}, or add contract files "
                                                 f"numbered v{app.version} (contracts/<name>.v<N>.sql)")
        for index, grant in enumerate(app.grants):
            if grant.contract not in known:
                raise ProjectError(
                    f"apps.{name}.grants[{index}].contract = {grant.contract!r}: no contract has that name",
                    where=where,
                    hint=f"known contracts: {', '.join(sorted(known)) or 'none'}; "
                         f"add contracts/{grant.contract}.v1.sql or fix the name",
                )


def _check_relations(config: ProjectConfig, contracts: list[ContractVersion], where: str) -> None:
    known = sorted({c.name for c in contracts})
    for name in config.contracts:
        if name not in known:
            raise ProjectError(f"[contracts.{name}] configures {name!r}, which is not a contract", where=where,
                               hint=f"known contracts: {', '.join(known) or 'none'}")
    columns: dict[str, set[str]] = {}
    for contract in contracts:
        columns.setdefault(contract.name, set()).update(contract.columns)
    for index, relation in enumerate(config.relations):
        for key, end in (("from", relation.source), ("to", relation.target)):
            name, column = end.split(".", 1)
            place = f"relations[{index}].{key} = {end!r}"
            if name not in columns:
                raise ProjectError(f"{place}: no contract is named {name!r}", where=where,
                                   hint=f"known contracts: {', '.join(known) or 'none'}")
            if column not in columns[name]:
                raise ProjectError(f"{place}: contract {name!r} has no column {column!r}",
                                   where=where, hint=f"its columns: {', '.join(sorted(columns[name]))}")


def _row_filters(name: str, app: AppConfig, contracts: list[ContractVersion],
                 where: str) -> dict[str, tuple[Condition, ...]]:
    filters: dict[str, tuple[Condition, ...]] = {}
    for index, grant in enumerate(app.grants):
        if grant.filter is None:
            continue
        place = f"apps.{name}.grants[{index}].filter (on {grant.contract!r})"
        try:
            conditions = parse_row_filter(grant.filter)
        except (ValueError, ApiError) as exc:
            message = exc.message if isinstance(exc, ApiError) else str(exc)
            raise ProjectError(f"{place} cannot be read: {message}", where=where,
                               hint='write it like a query string: "tenant_id=eq.{claims.tenant_id}"') from None
        for contract in (c for c in contracts if c.name == grant.contract):
            unknown = columns_of(conditions) - set(contract.columns)
            if unknown:
                raise ProjectError(f"{place} names {', '.join(sorted(unknown))}, not a column of {contract.label}",
                                   where=where, hint=f"its columns: {', '.join(contract.columns)}")
        filters[grant.contract] = conditions
    return filters


def load_project(root: Path) -> Project:
    root = root.resolve()
    config_path = root / CONFIG_FILE
    config = load_config(config_path)
    databases = list(config.databases)
    contracts = [load_contract_file(path, db) for path, db in _contract_files(root, databases)]
    _check_unique(contracts)
    versions = carry_forward(contracts, config.retired_versions)
    _check_apps(config, versions, str(config_path))
    _check_relations(config, contracts, str(config_path))
    check_mirrors(config, contracts, versions, str(config_path))
    modules = import_logic(root, f"gatehouse_logic_{config.project.name}")
    functions = published_functions(modules)
    sagas = collect_sagas(modules, config.databases)
    for name, app_config in config.apps.items():
        for granted in app_config.functions:
            if granted not in functions:
                raise ProjectError(f"apps.{name}.functions: {granted!r} is not published by any logic/*.py",
                                   where=str(config_path),
                                   hint=f"published: {', '.join(sorted(functions)) or 'none'}")
        for granted in app_config.sagas:
            if granted not in sagas.sagas:
                raise ProjectError(f"apps.{name}.sagas: {granted!r} is not declared by any logic/*.py",
                                   where=str(config_path),
                                   hint=f"declared sagas: {', '.join(sorted(sagas.sagas)) or 'none'}")
    for function in functions.values():
        if function.database and function.database not in config.databases:
            raise ProjectError(f"function {function.name!r} names database {function.database!r}, which "
                               "gatehouse.toml does not declare", where=str(root / "logic"),
                               hint=f"declared databases: {', '.join(config.databases)}")
    prefix = f"gh_{config.project.name}_"
    apps = {
        name: App(name=name, config=app, role=f"{prefix}app_{name}",
                  row_filters=_row_filters(name, app, contracts, str(config_path)))
        for name, app in config.apps.items()
    }
    return Project(root=root, config=config, contracts=tuple(contracts), versions=versions, apps=apps,
                   functions=functions, sagas=sagas)
