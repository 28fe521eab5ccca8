"""``[auth.issuers.<name>]``: the issuers whose JSON Web Tokens gatehouse trusts, as settings.

Checked when the project loads, so that a mistake in them is an error naming the key before anything serves:
each issuer pins its algorithms and has exactly one key source, a JWKS URL for asymmetric algorithms or a
shared secret for HS*, never both (what keeps an RSA public key from being used as an HS256 secret: see
:mod:`gatehouse.auth.jwt`, which verifies the tokens). Kept apart from the verifier so that loading a project
does not load an HTTP client and a cryptography library.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gatehouse.secrets import SecretRef

_NAME = r"^[a-z][a-z0-9_]{0,39}$"  # as gatehouse.config.NAME_PATTERN (not imported: config embeds this module)
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_HMAC = frozenset({"HS256", "HS384", "HS512"})
KEY_TYPES = {"RS256": "RSA", "RS384": "RSA", "RS512": "RSA", "PS256": "RSA", "PS384": "RSA", "PS512": "RSA",
             "ES256": "EC", "ES384": "EC", "ES512": "EC", "EdDSA": "OKP"}
"""Each asymmetric algorithm's JWK key type (``kty``)."""


class IssuerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    issuer: str = Field(min_length=1, description="the exact 'iss' of the tokens")
    jwks_url: str | None = Field(default=None, description="where the issuer publishes its public keys")
    secret: SecretRef = Field(default=None, description="'env:VAR' naming the HS* shared secret")
    algorithms: tuple[str, ...] = Field(min_length=1, description="the only algorithms accepted, e.g. ['RS256']")
    audience: str | tuple[str, ...] | None = Field(default=None, description="accepted 'aud'; none = not checked")
    app_claim: str = Field(default="azp", min_length=1, description="the claim naming the application")
    apps: dict[str, str] = Field(default={}, description="claim value → app name; empty: the value is the name")
    clock_skew_s: int = Field(default=30, ge=0, le=300)
    jwks_cache_s: int = Field(default=300, ge=1, le=86_400)
    jwks_timeout_s: float = Field(default=3.0, gt=0, le=60)
    jwks_min_refresh_s: float = Field(default=30.0, ge=0, le=3600)

    @field_validator("algorithms")
    @classmethod
    def _known_algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for alg in value:
            if alg.lower() == "none":
                raise ValueError("'none' (unsigned tokens) is never accepted")
            if alg not in _HMAC and alg not in KEY_TYPES:
                raise ValueError(f"unsupported algorithm {alg!r}; use one of {sorted(_HMAC | KEY_TYPES.keys())}")
        if value and any(a in _HMAC for a in value) and not all(a in _HMAC for a in value):
            raise ValueError("an issuer uses either HS* (shared secret) or asymmetric algorithms, never both")
        return tuple(dict.fromkeys(value))

    @field_validator("jwks_url")
    @classmethod
    def _https(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in _LOCAL_HOSTS):
            return value
        raise ValueError("jwks_url must be an https:// URL (plain http only to localhost)")

    @field_validator("apps")
    @classmethod
    def _app_names(cls, value: dict[str, str]) -> dict[str, str]:
        for app in value.values():
            if not re.fullmatch(_NAME, app):
                raise ValueError(f"{app!r} is not an app name")
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> IssuerConfig:
        symmetric = self.algorithms[0] in _HMAC
        if symmetric and (self.secret is None or self.jwks_url is not None):
            raise ValueError("HS* algorithms need 'secret' (and no 'jwks_url')")
        if not symmetric and (self.jwks_url is None or self.secret is not None):
            raise ValueError("asymmetric algorithms need 'jwks_url' (and no 'secret')")
        return self


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    issuers: dict[str, IssuerConfig] = {}

    @field_validator("issuers")
    @classmethod
    def _distinct(cls, value: dict[str, IssuerConfig]) -> dict[str, IssuerConfig]:
        seen: dict[str, str] = {}
        for name, issuer in value.items():
            if not re.fullmatch(_NAME, name):
                raise ValueError(f"{name!r} is not a valid issuer name (lowercase letters, digits, _)")
            if issuer.issuer in seen:
                raise ValueError(f"issuers {seen[issuer.issuer]!r} and {name!r} have the same 'issuer'")
            seen[issuer.issuer] = name
        return value
