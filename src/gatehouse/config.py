"""The models of ``gatehouse.toml``, validated at load.

Secrets are never literals in the file: a value that must be secret (a database URL, a password) is written
``"env:VAR"`` and read from the environment when it is used. Any setting can be overridden from the
environment with ``GATEHOUSE_<SECTION>__<KEY>[__<KEY>...]``, e.g. ``GATEHOUSE_DATABASES__SHOP__URL`` or
``GATEHOUSE_SERVER__PORT``; the override is applied before validation, so it is checked like the file.
"""

from __future__ import annotations

import os
import re
import tomllib
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from gatehouse.auth.jwt import AuthConfig
from gatehouse.errors import ProjectError
from gatehouse.secrets import SecretRef

NAME_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"
ENV_PREFIX = "GATEHOUSE_"

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Action = Literal["read", "insert", "update", "delete"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProjectSection(Strict):
    name: Name
    default_version: int | None = Field(
        default=None, ge=1, description="API version for profile 'public'; default: the newest."
    )


class DatabaseConfig(Strict):
    url: SecretRef = Field(default=None, description="'env:VAR' naming a PostgreSQL URL; none = embedded")
    authenticator_password: SecretRef = Field(
        default=None, description="'env:VAR' with the password of the authenticator role, if the server needs one"
    )


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
    auth_failures_per_minute: int = Field(default=30, ge=1, le=100_000,
                                          description="failed authentications per client address per minute")
    max_connections: int = Field(default=4096, ge=1, le=1_000_000, description="open connections per port")
    max_header_bytes: int = Field(default=32_768, ge=1024, le=1_048_576,
                                  description="request line and headers of one request (431 beyond)")
    header_timeout_s: float = Field(default=10.0, gt=0, le=3600,
                                    description="from a request's first byte to the end of its headers (408)")
    keepalive_timeout_s: float = Field(default=5.0, gt=0, le=3600,
                                       description="idle time before a keep-alive connection is closed")
    shutdown_grace_s: float = Field(default=10.0, ge=0, le=3600,
                                    description="on SIGTERM, how long requests being answered may still take")


class Quota(Strict):
    pool_size: int = Field(default=5, ge=1, le=200, description="concurrent database connections of this app")
    max_rows: int | None = Field(default=None, ge=1, le=1_000_000, description="cap on rows per response")
    statement_timeout_ms: int = Field(default=5000, ge=1, le=3_600_000)


class Grant(Strict):
    contract: Name
    actions: tuple[Action, ...] = ("read",)
    filter: str | None = Field(
        default=None, max_length=2000,
        description="rows this app may see and change, in the request dialect: tenant_id=eq.{claims.tenant_id}",
    )

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
    require_user: bool = Field(default=False, description="also require a user's JWT besides the app's key")

    @model_validator(mode="after")
    def _one_grant_per_contract(self) -> AppConfig:
        seen: set[str] = set()
        for grant in self.grants:
            if grant.contract in seen:
                raise ValueError(f"contract {grant.contract!r} is granted twice; merge the two grants")
            seen.add(grant.contract)
        return self


class ContractSettings(Strict):
    max_rows: int | None = Field(default=None, ge=1, le=1_000_000, description="cap on rows per response")
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
    versions: dict[Annotated[str, Field(pattern=r"^v[1-9][0-9]{0,3}$")], VersionSettings] = {}

    def version_settings(self, number: int) -> VersionSettings:
        return self.versions.get(f"v{number}", VersionSettings())

    @property
    def retired_versions(self) -> frozenset[int]:
        return frozenset(int(k[1:]) for k, v in self.versions.items() if v.status == "retired")


def _apply_env_overrides(data: dict[str, Any], environ: dict[str, str]) -> None:
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        path = [part.lower() for part in key.removeprefix(ENV_PREFIX).split("__")]
        if not all(re.fullmatch(r"[a-z0-9_]+", part) for part in path):
            continue
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            # A URL given straight in the environment is already outside the file: accept it as is.
            node[path[-1]] = f"env:{key}" if path[-1] in {"url", "authenticator_password", "secret"} else value


def _location(error: ErrorDetails) -> str:
    return ".".join(str(part) for part in error["loc"]) or "(top level)"


def load_config(path: Path, environ: dict[str, str] | None = None) -> ProjectConfig:
    """Read and validate ``gatehouse.toml``; every problem is reported with its key and what to do."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProjectError("no gatehouse.toml here", where=str(path.parent),
                           hint="run inside a project folder, pass --project PATH, or create one with "
                                "`gatehouse init`") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProjectError(f"not valid TOML: {exc}", where=str(path)) from None
    _apply_env_overrides(data, dict(os.environ if environ is None else environ))
    try:
        return ProjectConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"[{_location(err)}] {err['msg']}" for err in exc.errors(include_url=False)]
        raise ProjectError("invalid settings:\n  " + "\n  ".join(lines), where=str(path)) from None
