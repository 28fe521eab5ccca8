"""Secrets in ``gatehouse.toml`` are references, never literals: ``"env:VARIABLE"``, read when used."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import AfterValidator

from gatehouse.errors import ProjectError


def _is_reference(value: str | None) -> str | None:
    if value is not None and not value.startswith("env:"):
        raise ValueError('secrets are never written in the file: write "env:VARIABLE" and set VARIABLE '
                         "in the environment")
    return value


SecretRef = Annotated[str | None, AfterValidator(_is_reference)]
"""A setting that may only name an environment variable."""


def resolve_secret(reference: str | None, *, what: str) -> str | None:
    """Turn ``"env:VAR"`` into the variable's value, or say clearly which variable is missing."""
    if reference is None:
        return None
    variable = reference.removeprefix("env:")
    value = os.environ.get(variable)
    if not value:
        raise ProjectError(f"{what} names the environment variable {variable}, which is not set",
                           hint=f"export {variable}=... before running gatehouse")
    return value
