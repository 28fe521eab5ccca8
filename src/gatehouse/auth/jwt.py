"""JSON Web Tokens from an OIDC/OAuth provider (or signed with a shared secret), verified in memory.

Each trusted issuer is configured in ``[auth.issuers.<name>]`` with its own pinned algorithms and one key
source: a JWKS URL (asymmetric keys) or an HS* secret read from the environment, never both. Because one
issuer never accepts both a symmetric and an asymmetric algorithm, a token signed with HS256 using an RSA
public key as the "secret" (the classic algorithm-confusion attack) is refused, and ``none`` is refused
outright.

The token's unverified ``iss`` is used only to choose the configuration; everything after that (algorithm,
key, signature, ``iss``, ``aud``, ``exp``, ``nbf``, ``iat``) is checked against that configuration.

JWKS keys are fetched with :mod:`httpx` (PyJWT's ``PyJWKClient`` uses blocking ``urllib``, which would
stall the event loop). They are cached by ``kid``; an unknown ``kid`` triggers a refresh at most once per
``jwks_min_refresh_s`` and concurrent requests share the one fetch in flight. A failed fetch keeps the
last good keys, so an identity-provider outage does not lock out tokens already in circulation.

Verifying never touches the database, and no token is ever logged or echoed in an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Collection, Coroutine, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import httpx
import jwt

from gatehouse.auth.settings import KEY_TYPES, AuthConfig, IssuerConfig
from gatehouse.background import stop_tasks
from gatehouse.errors import InvalidClaims as InvalidClaims  # re-exported: it lives in the error tree
from gatehouse.errors import ProjectError, Unauthenticated
from gatehouse.secrets import resolve_secret

log = logging.getLogger(__name__)

_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
MAX_TOKEN_CHARS = 16_384
MAX_JWKS_BYTES = 1_048_576
_CURVE = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    app: str | None  # None: the token names no application (a user token sent along with an API key)
    subject: str | None
    issuer: str  # the configured issuer's name; the 'iss' URL is in claims
    claims: Mapping[str, Any]


def looks_like_jwt(value: str) -> bool:
    """Three base64url segments (the last may be empty), so a JWT can be told apart from a ``gh_`` key."""
    return bool(_JWT_SHAPE.match(value))


class _Jwk:
    """One public key of a JWKS; PyJWT keys are built on first use, once per algorithm."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.kid: str | None = data["kid"] if isinstance(data.get("kid"), str) else None
        self._built: dict[str, jwt.PyJWK] = {}

    def fits(self, alg: str) -> bool:
        data = self.data
        return data.get("kty") == KEY_TYPES.get(alg) and data.get("alg", alg) == alg and data.get("crv") == _CURVE.get(
            alg, data.get("crv"))

    def for_alg(self, alg: str) -> jwt.PyJWK:
        if alg not in self._built:
            self._built[alg] = jwt.PyJWK(self.data, algorithm=alg)
        return self._built[alg]


class _KeySet:
    """The cached JWKS of one issuer, with throttled, shared refreshes."""

    def __init__(self, name: str, config: IssuerConfig, client: _ClientHolder) -> None:
        self.name, self.config, self._client = name, config, client
        self.keys: list[_Jwk] = []
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self.inflight: asyncio.Task[None] | None = None

    async def candidates(self, kid: str | None, alg: str) -> list[_Jwk]:
        age = None if self._fetched_at is None else time.monotonic() - self._fetched_at
        if age is None:
            await self.refresh()
        elif age > self.config.jwks_cache_s and self._may_fetch():
            self._client.spawn(self.refresh())  # serve the cached keys; refresh behind the request
        found = self._match(kid, alg)
        if not found and kid is not None and not any(k.kid == kid for k in self.keys):
            await self.refresh()  # a key we have not seen: perhaps the issuer rotated
            found = self._match(kid, alg)
        return found

    def _match(self, kid: str | None, alg: str) -> list[_Jwk]:
        return [k for k in self.keys if (kid is None or k.kid == kid) and k.fits(alg)]

    def _may_fetch(self) -> bool:
        return self.inflight is not None or self._attempted_at is None or (
            time.monotonic() - self._attempted_at >= self.config.jwks_min_refresh_s)

    async def refresh(self) -> None:
        """Fetch the JWKS unless a fetch is in flight (then wait for it) or one started too recently."""
        if self.inflight is None:
            if not self._may_fetch():
                return
            self._attempted_at = time.monotonic()
            self.inflight = asyncio.get_running_loop().create_task(self._fetch())
        # shield: a caller that goes away (client disconnect) must not cancel the fetch others wait for
        await asyncio.shield(self.inflight)

    async def _fetch(self) -> None:
        assert self.config.jwks_url is not None
        try:
            async with asyncio.timeout(self.config.jwks_timeout_s):
                body = await self._download(self.config.jwks_url)
            keys = _parse_jwks(body)
        except (httpx.HTTPError, httpx.StreamError, OSError, ValueError, TimeoutError) as exc:
            kept = f"keeping the {len(self.keys)} last good key(s)" if self.keys else "no keys yet"
            log.warning("JWKS of issuer %r could not be fetched (%s: %s); %s",
                        self.name, type(exc).__name__, exc, kept)
        else:
            self.keys, self._fetched_at = keys, time.monotonic()
            log.info("JWKS of issuer %r loaded: %d key(s)", self.name, len(keys))
        finally:
            self.inflight = None

    async def _download(self, url: str) -> bytes:
        client = self._client.get()
        body = bytearray()
        async with client.stream("GET", url, headers={"Accept": "application/json"},
                                 timeout=self.config.jwks_timeout_s) as response:
            if response.status_code != 200:
                raise ValueError(f"HTTP status {response.status_code}")
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError("JWKS larger than 1 MiB")
        return bytes(body)


def _parse_jwks(body: bytes) -> list[_Jwk]:
    """The usable signature keys of a JWKS document; symmetric (``oct``) keys are ignored on purpose."""
    document = json.loads(body)
    raw = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(raw, list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys: list[_Jwk] = []
    for data in raw:
        if not isinstance(data, dict) or data.get("use", "sig") != "sig":
            continue
        candidate = _Jwk(data)
        algs = [alg for alg in KEY_TYPES if candidate.fits(alg)]
        try:
            if algs:
                candidate.for_alg(algs[0])  # build once now, so a malformed key is dropped here
                keys.append(candidate)
        except jwt.PyJWTError:
            log.debug("skipping an unusable JWKS key (kid %r)", candidate.kid)
    if not keys:
        raise ValueError("the JWKS holds no usable signature key")
    return keys


class _ClientHolder:
    """The one httpx client and the background refreshes of a verifier."""

    def __init__(self) -> None:
        self.client: httpx.AsyncClient | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def get(self) -> httpx.AsyncClient:
        if self.client is None:
            self.client = httpx.AsyncClient(follow_redirects=True, trust_env=False)
        return self.client

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class JwtVerifier:
    """Verifies bearer JWTs against the configured issuers; ``verify`` raises :class:`Unauthenticated`."""

    def __init__(self, config: AuthConfig, apps: Collection[str]) -> None:

        self._apps = frozenset(apps)
        self._holder = _ClientHolder()
        self._issuers: dict[str, tuple[str, IssuerConfig]] = {}
        self._secrets: dict[str, bytes] = {}
        self._keysets: dict[str, _KeySet] = {}
        for name, issuer in config.issuers.items():
            where = f"auth.issuers.{name}"
            unknown = sorted(set(issuer.apps.values()) - self._apps)
            if unknown:
                raise ProjectError(f"apps {unknown} are not defined in [apps]", where=where)
            self._issuers[issuer.issuer] = (name, issuer)
            if issuer.secret is not None:
                secret = (resolve_secret(issuer.secret, what=f"{where}.secret") or "").encode()
                needed = max(int(alg[2:]) // 8 for alg in issuer.algorithms)  # RFC 7518 §3.2: key ≥ hash size
                if len(secret) < needed:
                    raise ProjectError(f"this HS* secret needs at least {needed} bytes", where=f"{where}.secret")
                self._secrets[name] = secret
            else:
                self._keysets[name] = _KeySet(name, issuer, self._holder)

    @property
    def apps(self) -> frozenset[str]:
        return self._apps

    async def start(self) -> None:
        """Fetch every JWKS once; an unreachable provider is logged, not fatal (keys are fetched on demand)."""
        await asyncio.gather(*(keyset.refresh() for keyset in self._keysets.values()))
        for name, keyset in self._keysets.items():
            if not keyset.keys:
                log.warning("issuer %r has no keys yet; its tokens are refused until its JWKS answers", name)

    async def stop(self) -> None:
        tasks = [*self._holder.tasks, *(k.inflight for k in self._keysets.values() if k.inflight is not None)]
        await stop_tasks(tasks)
        if self._holder.client is not None:
            await self._holder.client.aclose()
            self._holder.client = None

    async def verify(self, token: str) -> TokenIdentity:
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated("JWT cryptographic operation failed", hint="The token is too long.")
        if token.count(".") != 2:
            raise Unauthenticated(f"Expected 3 parts in JWT; got {token.count('.') + 1}")
        try:
            unverified = jwt.decode_complete(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Unauthenticated("JWT cryptographic operation failed") from None
        header, payload = unverified["header"], unverified["payload"]
        if str(header.get("alg")).lower() == "none":  # refused before anything else is read from it, as PostgREST
            raise Unauthenticated("Wrong or unsupported encoding algorithm",
                                  details="JWT is unsecured but expected 'alg' was not 'none'")
        iss = payload.get("iss")
        found = self._issuers.get(iss) if isinstance(iss, str) else None
        if found is None:
            raise InvalidClaims("JWT issuer is not trusted")
        name, config = found
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in config.algorithms:
            raise Unauthenticated("Wrong or unsupported encoding algorithm",
                                  hint=f"Issuer {name!r} accepts {', '.join(config.algorithms)}.")
        claims = await self._check_signature(token, name, config, alg, header.get("kid"))
        _check_times(claims, time.time(), config.clock_skew_s)
        subject = claims.get("sub")
        return TokenIdentity(app=self._app_of(config, claims), subject=subject if isinstance(subject, str) else None,
                             issuer=name, claims=MappingProxyType(claims))

    async def _check_signature(self, token: str, name: str, config: IssuerConfig, alg: str,
                               kid: str | None) -> dict[str, Any]:
        keys: list[jwt.PyJWK | bytes]
        if name in self._secrets:
            keys = [self._secrets[name]]
        else:
            keys = []
            for jwk in await self._keysets[name].candidates(kid, alg):
                with contextlib.suppress(jwt.PyJWTError):
                    keys.append(jwk.for_alg(alg))
        if not keys:
            raise Unauthenticated("No suitable key or wrong key type")
        options: jwt.types.Options = {"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                                      "verify_aud": config.audience is not None, "require": ["iss"],
                                      "enforce_minimum_key_length": True}
        audience = config.audience if isinstance(config.audience, str | None) else list(config.audience)
        for key in keys:  # a token without 'kid' is tried against each key that fits its algorithm
            with contextlib.suppress(jwt.InvalidSignatureError):
                return _decode(token, key, alg, options, config.issuer, audience)
        raise Unauthenticated("No suitable key or wrong key type",  # PostgREST's words for a forged signature
                              details="None of the keys was able to decode the JWT")

    def _app_of(self, config: IssuerConfig, claims: Mapping[str, Any]) -> str | None:
        value = claims.get(config.app_claim)
        if value is None:
            return None
        app = config.apps.get(value) if config.apps and isinstance(value, str) else value
        if not isinstance(app, str) or app not in self._apps:
            raise InvalidClaims("The token names no known application",
                                hint=f"Claim {config.app_claim!r} must name an application of this project.")
        return app


def _decode(token: str, key: jwt.PyJWK | bytes, alg: str, options: jwt.types.Options, issuer: str,
            audience: str | list[str] | None) -> dict[str, Any]:
    """Signature, ``iss`` and ``aud`` through PyJWT; its errors become PostgREST's messages."""
    try:
        return jwt.decode(token, key, algorithms=[alg], options=options, issuer=issuer, audience=audience)
    except jwt.InvalidSignatureError:
        raise  # the caller may try another key
    except jwt.InvalidAudienceError as exc:
        if "format" in str(exc):  # PyJWT's "Invalid claim format in token": not a string or a list of strings
            raise InvalidClaims("The JWT 'aud' claim must be a string or an array of strings") from None
        raise InvalidClaims("JWT not in audience") from None
    except jwt.MissingRequiredClaimError as exc:
        raise InvalidClaims("JWT not in audience" if exc.claim == "aud" else "JWT issuer is not trusted") from None
    except jwt.InvalidIssuerError:
        raise InvalidClaims("JWT issuer is not trusted") from None
    except (jwt.exceptions.InvalidSubjectError, jwt.exceptions.InvalidJTIError):
        raise InvalidClaims("JWT claims are malformed") from None
    except jwt.InvalidAlgorithmError:
        raise Unauthenticated("Wrong or unsupported encoding algorithm") from None
    except jwt.InvalidKeyError:
        raise Unauthenticated("No suitable key or wrong key type") from None
    except jwt.PyJWTError:
        raise Unauthenticated("JWT cryptographic operation failed") from None


def _check_times(claims: Mapping[str, Any], now: float, leeway: float) -> None:
    """``exp`` is required (a token that never expires is refused); ``nbf`` and ``iat`` when present."""
    exp, nbf, iat = (_numeric(claims, name) for name in ("exp", "nbf", "iat"))
    if exp is None:
        raise InvalidClaims("JWT has no expiry", hint="Tokens must carry an 'exp' claim.")
    if exp <= now - leeway:
        raise InvalidClaims("JWT expired")
    if nbf is not None and nbf > now + leeway:
        raise InvalidClaims("JWT not yet valid")
    if iat is not None and iat > now + leeway:
        raise InvalidClaims("JWT issued at future")


def _numeric(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidClaims(f"The JWT '{name}' claim must be a number")
    return float(value)
