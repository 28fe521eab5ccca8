"""Secrets in ``gatehouse.toml`` are references, never literals: ``"env:VARIABLE"``, read when used.

A database URL is a secret only when it carries a password: ``postgresql://app@db.internal:5432/shop``
(the password then comes from ``PGPASSWORD`` or ``~/.pgpass``, or the server trusts the user) may be written
in the file as it is; ``postgresql://app:s3cret@db/shop`` may not.
"""

from __future__ import annotations

import os
from typing import Annotated
from urllib.parse import parse_qs, urlsplit

from pydantic import AfterValidator

from gatehouse.errors import ProjectError

ENV = "env:"
NOT_IN_FILE = 'secrets are never written in the file: write "env:VARIABLE" and set VARIABLE in the environment'


def _is_reference(value: str | None) -> str | None:
    if value is not None and not value.startswith(ENV):
        raise ValueError(NOT_IN_FILE)
    return value


def url_has_password(url: str) -> bool:
    """True when a PostgreSQL URL carries a password (``user:password@`` or ``?password=``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return True  # cannot tell: treat as secret
    userinfo = parts.netloc.rpartition("@")[0]
    return bool(userinfo.partition(":")[2]) or bool(parse_qs(parts.query).get("password"))


def _reference_or_url_without_password(value: str | None) -> str | None:
    if value is None or value.startswith(ENV):
        return value
    if not value.startswith(("postgresql://", "postgres://")):
        raise ValueError("must be a PostgreSQL URL (postgresql://USER@HOST:PORT/DATABASE) or \"env:VARIABLE\"")
    if url_has_password(value):
        raise ValueError("holds a password, and passwords are never written in the file: write url = "
                         '"env:VARIABLE" and set VARIABLE to the URL in the environment, or drop the password '
                         "from the URL and give it in PGPASSWORD or ~/.pgpass")
    return value


def _redis_reference_or_url_without_password(value: str | None) -> str | None:
    if value is None or value.startswith(ENV):
        return value
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError('must be a Redis URL (redis://HOST:6379/0, rediss://..., unix://PATH) or "env:VARIABLE"')
    if url_has_password(value):
        raise ValueError("holds a password, and passwords are never written in the file: write url = "
                         '"env:VARIABLE" and set VARIABLE to the URL in the environment')
    return value


def _endpoint_reference_or_url_without_password(value: str | None) -> str | None:
    if value is None or value.startswith(ENV):
        return value
    if "://" not in value:
        raise ValueError('must be a URL (nats://HOST:4222, amqp://HOST:5672/, redis://HOST:6379/0, '
                         'https://...) or "env:VARIABLE"')
    if url_has_password(value):
        raise ValueError("holds a password, and passwords are never written in the file: write url = "
                         '"env:VARIABLE" and set VARIABLE to the URL in the environment')
    return value


SecretRef = Annotated[str | None, AfterValidator(_is_reference)]
"""A setting that may only name an environment variable."""

DatabaseUrl = Annotated[str | None, AfterValidator(_reference_or_url_without_password)]
RedisUrl = Annotated[str | None, AfterValidator(_redis_reference_or_url_without_password)]
EndpointUrl = Annotated[str | None, AfterValidator(_endpoint_reference_or_url_without_password)]
"""A broker's or webhook receiver's URL, under the same rule."""
"""A database URL: ``"env:VAR"``, or a literal URL that has no password in it."""


def source_of(reference: str | None) -> str:
    """Where a setting's value comes from, for messages: ``$VARIABLE`` or ``gatehouse.toml``."""
    if reference is not None and reference.startswith(ENV):
        return f"${reference.removeprefix(ENV)}"
    return "gatehouse.toml"


def resolve_secret(reference: str | None, *, what: str) -> str | None:
    """Turn ``"env:VAR"`` into the variable's value (a literal is returned as it is), or say which is missing."""
    if reference is None:
        return None
    if not reference.startswith(ENV):
        return reference
    variable = reference.removeprefix(ENV)
    value = os.environ.get(variable)
    if not value:
        raise ProjectError(f"{what} names the environment variable {variable}, which is not set",
                           hint=f"export {variable}=... before running gatehouse")
    return value
