"""The models of ``gatehouse.toml``, validated at load.

Secrets are never literals in the file: a password (or a database URL that holds one) is written
``"env:VAR"`` and read from the environment when it is used; a URL without a password may be written as it
is. Any setting can be overridden from the environment with ``GATEHOUSE_<SECTION>__<KEY>[__<KEY>...]``, e.g.
``GATEHOUSE_DATABASES__SHOP__URL`` or ``GATEHOUSE_SERVER__PORT``; the override is applied before validation,
so it is checked like the file, and a mistake in it names the variable. Mistakes are reported by
:mod:`gatehouse.config_errors` with the file, the full key, what was given and what is allowed.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gatehouse.admin.settings import ConsoleConfig
from gatehouse.auth.settings import AuthConfig
from gatehouse.config_alerts import AlertsConfig
from gatehouse.config_errors import ENV_PREFIX, KeyPath, describe_errors, env_variable, key_text
from gatehouse.config_events import EventsSettings, MirrorConfig, SinkConfig
from gatehouse.errors import ProjectError
from gatehouse.limits.gcra import Rate
from gatehouse.secrets import DatabaseUrl, RedisUrl, SecretRef

NAME_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
DURATION = re.compile(r"^\s*(?P<n>[0-9]{1,7})\s*(?P<unit>ms|s|sec|min|m|h)\s*$")
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}
Action = Literal["read", "insert", "update", "delete", "events"]


def parse_duration(text: str) -> float:
    """``"30s"``, ``"5min"``, ``"500ms"``, ``"1h"`` → seconds; the ValueError says what is accepted."""
    match = DURATION.match(text)
    if match is None or int(match["n"]) == 0:
        raise ValueError(f"cannot read the duration {text!r}: write e.g. \"30s\", \"5min\", \"500ms\" or \"1h\"")
    return int(match["n"]) * DURATION_UNITS[match["unit"]]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProjectSection(Strict):
    name: Name
    default_version: int | None = Field(
        default=None, ge=1, description="API version for profile 'public'; default: the newest."
    )


class DatabaseConfig(Strict):
    url: DatabaseUrl = Field(default=None, description="a PostgreSQL URL without a password, or 'env:VAR' "
                                                       "naming one (with a password); none = embedded")
    authenticator_password: SecretRef = Field(
        default=None, description="'env:VAR' with the password of the authenticator role, if the server needs one"
    )
    connect_timeout_s: float = Field(default=10.0, gt=0, le=300,
                                     description="how long to wait for the server to answer a login")
    replicas: tuple[DatabaseUrl, ...] = Field(
        default=(), max_length=16,
        description="streaming replicas of this database (URLs as for url), named r1, r2... in this order; "
                    "apps whose reads allow it are served by them while they are fresh enough")
    replica_check_ms: int = Field(default=200, ge=20, le=60_000,
                                  description="how often the primary's heartbeat is written and each replica's "
                                              "lag is read")
    pooler_url: DatabaseUrl = Field(
        default=None,
        description="a transaction-mode pooler (PgBouncer) in front of this database, for the apps' pools only: "
                    "it must hold one database per app, <database>__<app>, whose connect_query sets the app's "
                    "role (`gatehouse pooler` prints them); migrations, apply, LISTEN and gatehouse's own "
                    "writers keep using url")
    pooler_prepared_statements: bool = Field(
        default=False, description="the pooler keeps protocol-level prepared statements (PgBouncer 1.21+ with "
                                   "max_prepared_statements > 0): the apps' statements are prepared once, not "
                                   "parsed on every request")

    @model_validator(mode="after")
    def _pooler_needs_url(self) -> DatabaseConfig:
        if self.pooler_url is not None and self.url is None:
            raise ValueError("pooler_url needs url: the embedded PostgreSQL has no pooler in front of it")
        return self


class ServerConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=3000, ge=0, le=65535)
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(default=3001, ge=0, le=65535)
    max_rows: int = Field(default=1000, ge=1, le=1_000_000)
    max_query_length: int = Field(default=8192, ge=256, le=1_000_000, description="URL path and query (414 beyond)")
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=1_073_741_824)
    max_body_rows: int = Field(default=1000, ge=1, le=1_000_000)
    max_json_depth: int = Field(default=32, ge=2, le=512)
    audit_query_values: bool = Field(default=False, description="keep filter values in the audit (else ***)")
    debug: bool = Field(default=False, description="add PostgreSQL's own error text to errors: never in production")
    pool_timeout_ms: int = Field(default=5000, ge=1, le=600_000)
    pool_max_idle_s: float = Field(default=30.0, gt=0, le=86_400,
                                   description="a pooled database connection idle this long is closed")
    pool_max_lifetime_s: float = Field(default=1800.0, gt=0, le=604_800,
                                       description="a pooled database connection this old is closed once free")
    group_statements: int = Field(default=32, ge=1, le=1000,
                                  description="requests of one statement waiting for one app's busy connections "
                                              "that the next free one runs together in one round trip at most "
                                              "(inserts in one transaction, one commit); a group the database "
                                              "refuses runs each alone; 1: each alone")
    auth_failures_per_minute: int = Field(default=30, ge=1, le=100_000,
                                          description="failed authentications per client address per minute")
    admission_wait_ms: int = Field(default=200, ge=0, le=60_000,
                                   description="how long a request waits for one of its app's max_in_flight slots")
    fair_sharing: bool = Field(default=True, description="serve the apps by turns once max_active requests are "
                               "being answered (limits/fair.py); false: first come, first served")
    max_active: int | None = Field(default=None, ge=1, le=100_000,
                                   description="requests being answered at once, all apps together; the next ones "
                                               "queue per app and are served by turns (an app under its share goes "
                                               "at once); default: the largest app pool_size plus "
                                               "group_statements, at least twice that pool_size")
    max_queued: int = Field(default=1000, ge=1, le=1_000_000,
                            description="requests of one app queued for a turn (429 beyond)")
    max_connections: int = Field(default=4096, ge=1, le=1_000_000, description="open connections per port")
    max_header_bytes: int = Field(default=32_768, ge=1024, le=1_048_576,
                                  description="request line and headers of one request (431 beyond)")
    header_timeout_s: float = Field(default=10.0, gt=0, le=60,
                                    description="a connection waiting for a request's headers (new or idle "
                                                "keep-alive) is closed after this")
    keepalive_timeout_s: float | None = Field(default=None, gt=0, le=60,
                                              description="no longer used: header_timeout_s bounds idle keep-alive "
                                                          "connections too")
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600,
                                  description="a request's whole body must arrive within this (408)")
    shutdown_grace_s: float = Field(default=10.0, ge=0, le=3600,
                                    description="on SIGTERM, how long requests being answered may still take")
    shutdown_drain_s: float = Field(default=0.0, ge=0, le=300,
                                    description="on SIGTERM, how long /ready answers 503 (draining) while both "
                                                "ports still serve, before they stop accepting: time for a load "
                                                "balancer's health check to send new requests elsewhere")
    saga_wait_max_s: float = Field(default=30.0, ge=0, le=300,
                                   description="the longest a POST /sagas/<name> with Prefer: wait=<s> waits for "
                                               "the saga to finish before answering 202")
    saga_lease_s: float = Field(default=15.0, ge=1, le=600,
                                description="how long a saga run is leased to the instance running it (renewed "
                                            "every third of it): after a crash, another instance takes the run "
                                            "over once this has passed")
    trusted_proxies: tuple[str, ...] = Field(default=(), description="addresses/CIDRs whose Forwarded and "
                                             "X-Forwarded-* headers are believed")
    http: Literal["auto", "1", "2"] = Field(default="auto", description="HTTP/1.1, HTTP/2, or both (auto)")
    tls_cert_file: str | None = Field(default=None, description="PEM certificate (chain), relative to the project")
    tls_key_file: str | None = Field(default=None, description="PEM private key (PKCS#8), relative to the project")
    tls_key_password: SecretRef = Field(default=None, description="'env:VAR' with the key's password, if any")

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not an IP address or CIDR (e.g. 10.0.0.0/8)") from None
        return value


class Quota(Strict):
    pool_size: int = Field(default=5, ge=1, le=200, description="concurrent database connections of this app")
    max_rows: int | None = Field(default=None, ge=1, le=1_000_000, description="cap on rows per response")
    statement_timeout_ms: int = Field(default=5000, ge=1, le=3_600_000)
    rate: str | None = Field(default=None, description='requests per second, minute, hour or day: "50/s", '
                                                       '"3000/min" (429 beyond, with RateLimit headers)')
    burst: int | None = Field(default=None, ge=1, le=1_000_000_000,
                              description="requests admitted at once after a quiet spell (default: the rate's count)")
    max_in_flight: int | None = Field(default=None, ge=1, le=100_000,
                                      description="this app's requests answered at once; more wait, then 429")
    weight: int = Field(default=1, ge=1, le=1000,
                        description="this app's share of the server relative to other apps', when requests queue")

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            Rate.parse(value)  # its ValueError names what is accepted
        return value


class ReadRouting(Strict):
    """Where an app's reads may go (``reads = { from = "replica", max_staleness = "10s" }``); writes, logic
    and cached contracts' reads always go to the primary."""

    source: Literal["primary", "replica", "replica_only"] = Field(
        default="primary", alias="from",
        description="primary; replica (a fresh enough replica, else the primary); replica_only (else 503)")
    max_staleness: str = Field(default="10s", description='how old the data of a replica read may be: "10s", '
                                                          '"500ms" (at least twice replica_check_ms)')

    @field_validator("max_staleness")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value

    @property
    def max_staleness_s(self) -> float:
        return parse_duration(self.max_staleness)


class Grant(Strict):
    contract: Name
    actions: tuple[Action, ...] = ("read",)
    filter: str | None = Field(
        default=None, max_length=2000,
        description="rows this app may see and change, in the request dialect: tenant_id=eq.{claims.tenant_id}",
    )
    rate: str | None = Field(default=None, description='a limit of its own for these actions on this contract: "5/s"')
    burst: int | None = Field(default=None, ge=1, le=1_000_000_000)
    reads: ReadRouting | None = Field(default=None, description="where reads of this contract go (default: "
                                                                "the app's reads)")

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            Rate.parse(value)
        return value

    @field_validator("actions")
    @classmethod
    def _not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("a grant needs at least one action: read, insert, update or delete")
        return tuple(dict.fromkeys(value))


class AppConfig(Strict):
    description: str = ""
    version: int | None = Field(default=None, ge=1, description="the API version this app gets for 'public'")
    quota: Quota = Quota()
    grants: tuple[Grant, ...] = ()
    functions: tuple[Name, ...] = Field(default=(), description="logic functions (logic/*.py) this app may call")
    sagas: tuple[Name, ...] = Field(default=(), description="sagas (logic/*.py) this app may start over "
                                    "POST /sagas/<name>")
    require_user: bool = Field(default=False, description="also require a user's JWT besides the app's key")
    reads: ReadRouting = Field(default=ReadRouting(), description="where this app's reads may go")

    @model_validator(mode="after")
    def _one_grant_per_contract(self) -> AppConfig:
        seen: set[str] = set()
        for grant in self.grants:
            if grant.contract in seen:
                raise ValueError(f"contract {grant.contract!r} is granted twice; merge the two grants")
            seen.add(grant.contract)
        return self


class RedisConfig(Strict):
    """The Redis that several instances share their rate limits and cache through (none: each instance alone)."""

    url: RedisUrl = Field(default=None, description="redis://host:6379/0, or 'env:VAR' naming one (with a "
                                                       "password); none = limits and cache in this process only")
    timeout_ms: int = Field(default=50, ge=1, le=5000,
                            description="a Redis answer later than this counts as a failure (limits fall back "
                                        "to this instance's share, the cache to the database)")
    key_prefix: str = Field(default="gatehouse:", max_length=100, pattern=r"^[A-Za-z0-9:_.-]*$",
                            description="prefix of every key gatehouse writes (several projects on one Redis)")


class CacheConfig(Strict):
    """The response cache of this instance (contracts opt in with ``[contracts.x] cache = "30s"``)."""

    max_bytes: int = Field(default=64 * 1024 * 1024, ge=0, le=64 * 1024**3,
                           description="bodies kept in this process, at most (least recently used go first)")
    max_entry_bytes: int = Field(default=1024 * 1024, ge=1, le=1024**3,
                                 description="a response larger than this is never cached")
    poll_ms: int = Field(default=100, ge=10, le=60_000,
                         description="how often the data versions are read: the bound on serving an answer "
                                     "older than a write made by someone else (SQL, another instance)")


class ContractSettings(Strict):
    max_rows: int | None = Field(default=None, ge=1, le=1_000_000, description="cap on rows per response")
    cache: str | None = Field(default=None, description='cache its reads for up to this long: "30s", "5min" '
                                                        '(a write to its tables ends an entry at once)')
    cache_apps: tuple[Name, ...] | None = Field(default=None, description="only these apps' reads are cached "
                                                                          "(default: every app's)")
    client_max_age: str | None = Field(default=None, description='let clients reuse an answer this long without '
                                                                 'asking ("10s"); default: they revalidate (304)')

    @field_validator("cache", "client_max_age")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)  # its ValueError names what is accepted
        return value
    allow_unfiltered_writes: bool = Field(
        default=False, description="allow PATCH and DELETE with no filter (they change every row)"
    )


class VersionSettings(Strict):
    """The life cycle of a released API version: ``deprecated`` warns callers, ``retired`` refuses them (410)."""

    status: Literal["current", "deprecated", "retired"] = "current"
    sunset: date | None = Field(default=None, description="when it will be retired (the Sunset header)")


class RelationConfig(Strict):
    """A link the database cannot know (e.g. between views): ``from`` embeds ``to`` as one object."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    source: str = Field(alias="from", pattern=r"^[a-z][a-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")
    target: str = Field(alias="to", pattern=r"^[a-z][a-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")


class ProjectConfig(Strict):
    project: ProjectSection
    databases: dict[Name, DatabaseConfig] = Field(min_length=1)
    server: ServerConfig = ServerConfig()
    apps: dict[Name, AppConfig] = {}
    relations: tuple[RelationConfig, ...] = ()
    contracts: dict[Name, ContractSettings] = {}
    auth: AuthConfig = AuthConfig()
    redis: RedisConfig = RedisConfig()
    cache: CacheConfig = CacheConfig()
    versions: dict[Annotated[str, Field(pattern=r"^v[1-9][0-9]{0,3}$")], VersionSettings] = {}
    alerts: AlertsConfig = AlertsConfig()
    events: dict[Name, EventsSettings] = Field(default={}, description="contracts whose changes are published")
    sinks: dict[Name, SinkConfig] = Field(default={}, description="brokers and webhooks events are relayed to")
    mirrors: dict[Name, MirrorConfig] = Field(default={}, description="local read copies of evented contracts")
    console: ConsoleConfig = ConsoleConfig()

    def version_settings(self, number: int) -> VersionSettings:
        return self.versions.get(f"v{number}", VersionSettings())

    @property
    def retired_versions(self) -> frozenset[int]:
        return frozenset(int(k[1:]) for k, v in self.versions.items() if v.status == "retired")


def _is_secret_key(key: str) -> bool:
    return key == "url" or key.endswith(("password", "secret", "_token"))


def _apply_env_overrides(data: dict[str, Any], environ: dict[str, str]) -> dict[KeyPath, str]:
    """Apply ``GATEHOUSE_A__B=value`` to the file's data; returns key path → variable, for messages."""
    applied: dict[KeyPath, str] = {}
    for key, value in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        path = tuple(part.lower() for part in key.removeprefix(ENV_PREFIX).split("__"))
        if not all(re.fullmatch(r"[a-z0-9_]+", part) for part in path):
            raise ProjectError(f"{key} (in the environment) is not a setting's name",
                               hint=f"write {env_variable(('section', 'key'))}: the keys of gatehouse.toml in "
                                    "capitals, joined by double underscores")
        node = data
        for depth, part in enumerate(path[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ProjectError(f"{key} (in the environment) sets {key_text(path)}, but "
                                   f"{key_text(path[: depth + 1])} is a setting, not a section",
                                   hint=f"did you mean {env_variable(path[: depth + 1])}?")
        # A URL or password given straight in the environment is already outside the file: accept it as is.
        node[path[-1]] = f"env:{key}" if _is_secret_key(path[-1]) else _env_value(key, value)
        applied[path] = key
    return applied


def _env_value(variable: str, value: str) -> Any:
    """A list or table is written as in TOML (``GATEHOUSE_SERVER__TRUSTED_PROXIES='["10.0.0.0/8"]'``); anything
    else is the string, which validation converts (numbers, booleans) like the file's values."""
    if not value.lstrip().startswith(("[", "{")):
        return value
    try:
        return tomllib.loads(f"value = {value}")["value"]
    except tomllib.TOMLDecodeError as exc:
        raise ProjectError(f"{variable} (in the environment) is not a TOML list or table: {exc}",
                           hint=f"""write it as in gatehouse.toml, e.g. {variable}='["a", "b"]'""") from None


def _not_a_folder(path: Path) -> ProjectError:
    """``--project`` (or ``GATEHOUSE_PROJECT``) named a file, most often the project's own ``gatehouse.toml``:
    the folder is what is asked for, and the message says which one to pass instead."""
    file = next((p for p in (path.parent, *path.parent.parents) if p.is_file()), path.parent)
    if file == path.parent and file.name == path.name:
        return ProjectError(f"{file} is the project's settings file, not its folder",
                            hint=f"pass the folder that holds it: --project {file.parent}")
    return ProjectError(f"{file} is a file, not a project folder" if file == path.parent
                        else f"{path.parent} is not a project folder: {file} is a file",
                        hint="--project (or GATEHOUSE_PROJECT) takes the folder that holds gatehouse.toml")


def load_config(path: Path, environ: dict[str, str] | None = None) -> ProjectConfig:
    """Read and validate ``gatehouse.toml``; every problem is reported with its key and what to do."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProjectError("no gatehouse.toml here", where=str(path.parent),
                           hint="run inside a project folder, pass --project PATH, or create one with "
                                "`gatehouse init`") from None
    except NotADirectoryError:
        raise _not_a_folder(path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ProjectError(f"not valid TOML: {exc}", where=str(path)) from None
    from_env = _apply_env_overrides(data, dict(os.environ if environ is None else environ))
    try:
        return ProjectConfig.model_validate(data)
    except ValidationError as exc:
        lines = describe_errors(exc.errors(include_url=False), data, ProjectConfig, from_env)
        raise ProjectError("invalid settings:\n  " + "\n  ".join(lines), where=str(path)) from None
