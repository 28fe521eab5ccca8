"""JWT verification against a real JWKS served over HTTP: keys, algorithms, claims, caching, outages."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError

from gatehouse.auth.jwt import InvalidClaims, JwtVerifier, TokenIdentity, looks_like_jwt
from gatehouse.auth.settings import AuthConfig, IssuerConfig
from gatehouse.errors import Unauthenticated

ISS = "https://idp.example.test/"
AUD = "gatehouse"
APPS = {"web", "mobile"}
SECRET_ENV = "GH_TEST_JWT_SECRET"


# --- a JWKS server on a free local port ----------------------------------------------------------


@dataclass
class JwksServer:
    url: str = ""
    keys: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    delay_s: float = 0.0
    httpd: ThreadingHTTPServer | None = None

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    state = JwksServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests += 1
            time.sleep(state.delay_s)
            body = json.dumps({"keys": state.keys}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    state.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{state.httpd.server_address[1]}/.well-known/jwks.json"
    threading.Thread(target=state.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield state
    state.stop()


# --- keys and tokens ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)]


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_jwk(private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(private, rsa.RSAPrivateKey):
        data = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    else:
        data = jwt.algorithms.ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return {**data, "kid": kid, "use": "sig"}


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": ISS, "aud": AUD, "sub": "user-42", "azp": "web", "iat": now, "exp": now + 300,
            "email": "ada@example.test"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(key: Any, kid: str | None, *, alg: str = "RS256", **overrides: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(**overrides), key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A token built without PyJWT, for what PyJWT refuses to produce (alg none, HMAC with a PEM key)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b"" if secret is None else hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


# --- verifiers ------------------------------------------------------------------------------------

MakeVerifier = Callable[..., Any]


@pytest.fixture
async def make_verifier(jwks: JwksServer, rsa_keys: list[rsa.RSAPrivateKey]) -> AsyncIterator[MakeVerifier]:
    """``await make_verifier(**issuer_settings)``: a started verifier for one issuer (the local JWKS by default)."""
    started: list[JwtVerifier] = []
    if not jwks.keys:
        jwks.keys = [public_jwk(rsa_keys[0], "k1")]

    async def make(**settings: Any) -> JwtVerifier:
        issuer: dict[str, Any] = {"issuer": ISS, "jwks_url": jwks.url, "algorithms": ["RS256"], "audience": AUD}
        issuer.update(settings)
        verifier = JwtVerifier(AuthConfig.model_validate({"issuers": {"idp": issuer}}), APPS)
        await verifier.start()
        started.append(verifier)
        return verifier

    yield make
    for verifier in started:
        await verifier.stop()


async def refused(verifier: JwtVerifier, token: str, message: str, code: str = "PGRST301") -> Unauthenticated:
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify(token)
    error = caught.value
    assert (error.message, error.code, error.status) == (message, code, 401)
    assert token not in str(error.body()) and token not in str(error.headers)
    return error


# --- accepted tokens ------------------------------------------------------------------------------


async def test_valid_rs256_token(make_verifier: MakeVerifier, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    verifier = await make_verifier()
    identity = await verifier.verify(sign(rsa_keys[0], "k1"))
    assert isinstance(identity, TokenIdentity)
    assert (identity.app, identity.subject, identity.issuer) == ("web", "user-42", "idp")
    assert identity.claims["email"] == "ada@example.test" and identity.claims["iss"] == ISS
    with pytest.raises(TypeError):
        identity.claims["sub"] = "someone else"  # type: ignore[index]


async def test_app_through_a_map_and_another_claim(make_verifier: MakeVerifier,
                                                   rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    verifier = await make_verifier(app_claim="client_id", apps={"0oa-mobile-client": "mobile"})
    identity = await verifier.verify(sign(rsa_keys[0], "k1", client_id="0oa-mobile-client"))
    assert identity.app == "mobile"
    await refused(verifier, sign(rsa_keys[0], "k1", client_id="web"), "The token names no known application",
                  "PGRST303")


async def test_token_without_app_claim_is_a_user_token(make_verifier: MakeVerifier,
                                                       rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    verifier = await make_verifier()
    identity = await verifier.verify(sign(rsa_keys[0], "k1", azp=None))
    assert identity.app is None and identity.subject == "user-42"


async def test_audience_list_and_es256(jwks: JwksServer, make_verifier: MakeVerifier,
                                       ec_key: ec.EllipticCurvePrivateKey) -> None:
    jwks.keys = [public_jwk(ec_key, "ec1")]
    verifier = await make_verifier(algorithms=["ES256"], audience=["other", AUD])
    assert (await verifier.verify(sign(ec_key, "ec1", alg="ES256", aud=[AUD, "x"]))).app == "web"


async def test_clock_skew_within_leeway(make_verifier: MakeVerifier, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    now = int(time.time())
    lenient = await make_verifier(clock_skew_s=30)
    for token in (sign(rsa_keys[0], "k1", exp=now - 10), sign(rsa_keys[0], "k1", nbf=now + 10, iat=now + 10)):
        assert (await lenient.verify(token)).app == "web"
    strict = await make_verifier(clock_skew_s=0)
    await refused(strict, sign(rsa_keys[0], "k1", exp=now - 10), "JWT expired", "PGRST303")
    await refused(strict, sign(rsa_keys[0], "k1", iat=now + 60), "JWT issued at future", "PGRST303")


async def test_hs256_issuer_with_secret_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "s3cr3t-" * 6
    monkeypatch.setenv(SECRET_ENV, secret)
    config = AuthConfig.model_validate({"issuers": {"supabase": {
        "issuer": ISS, "secret": f"env:{SECRET_ENV}", "algorithms": ["HS256"], "audience": "authenticated",
        "app_claim": "app"}}})
    verifier = JwtVerifier(config, APPS)
    await verifier.start()
    try:
        good = jwt.encode(claims(aud="authenticated", app="mobile"), secret, algorithm="HS256")
        identity = await verifier.verify(good)
        assert (identity.app, identity.issuer) == ("mobile", "supabase")
        forged = jwt.encode(claims(aud="authenticated", app="mobile"), "x" * 48, algorithm="HS256")
        await refused(verifier, forged, "No suitable key or wrong key type")
    finally:
        await verifier.stop()


# --- refused tokens -------------------------------------------------------------------------------


async def test_forged_signature(make_verifier: MakeVerifier, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    verifier = await make_verifier()
    await refused(verifier, sign(rsa_keys[1], "k1"), "No suitable key or wrong key type")
    header, _payload, signature = sign(rsa_keys[0], "k1").split(".")
    tampered = b64(json.dumps(claims(sub="admin")).encode())
    error = await refused(verifier, f"{header}.{tampered}.{signature}", "No suitable key or wrong key type")
    assert error.details == "None of the keys was able to decode the JWT"  # PostgREST's words


@pytest.mark.parametrize(("overrides", "message"), [
    ({"exp": -3600}, "JWT expired"),
    ({"nbf": 3600}, "JWT not yet valid"),
    ({"aud": "someone-else"}, "JWT not in audience"),
    ({"aud": None}, "JWT not in audience"),
    ({"exp": None}, "JWT has no expiry"),
    ({"exp": "tomorrow"}, "The JWT 'exp' claim must be a number"),
    ({"nbf": "soon"}, "The JWT 'nbf' claim must be a number"),
    ({"aud": {"not": "a string"}}, "The JWT 'aud' claim must be a string or an array of strings"),
    ({"azp": "stranger"}, "The token names no known application"),
])
async def test_claims_refused(make_verifier: MakeVerifier, rsa_keys: list[rsa.RSAPrivateKey],
                              overrides: dict[str, Any], message: str) -> None:
    now = int(time.time())
    relative: dict[str, Any] = {k: now + v if k in {"exp", "nbf"} and isinstance(v, int) else v
                                for k, v in overrides.items()}
    verifier = await make_verifier()
    error = await refused(verifier, sign(rsa_keys[0], "k1", **relative), message, "PGRST303")
    assert isinstance(error, InvalidClaims)


async def test_wrong_issuer(make_verifier: MakeVerifier, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    verifier = await make_verifier()
    await refused(verifier, sign(rsa_keys[0], "k1", iss="https://evil.example.test/"), "JWT issuer is not trusted",
                  "PGRST303")
    await refused(verifier, sign(rsa_keys[0], "k1", iss=None), "JWT issuer is not trusted", "PGRST303")


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_alg_none(make_verifier: MakeVerifier, alg: str) -> None:
    verifier = await make_verifier()
    token = hand_made({"alg": alg, "typ": "JWT", "kid": "k1"}, claims(), None)
    await refused(verifier, token, "Wrong or unsupported encoding algorithm")


async def test_hs_rs_confusion(make_verifier: MakeVerifier, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    """HS256 'signed' with the issuer's public RSA key as the secret: valid HMAC, still refused."""
    verifier = await make_verifier()
    pem = rsa_keys[0].public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    for secret in (pem, pem.strip()):
        token = hand_made({"alg": "HS256", "typ": "JWT", "kid": "k1"}, claims(), secret)
        await refused(verifier, token, "Wrong or unsupported encoding algorithm")


async def test_es256_token_for_rs256_issuer(make_verifier: MakeVerifier, ec_key: ec.EllipticCurvePrivateKey) -> None:
    verifier = await make_verifier()
    await refused(verifier, sign(ec_key, "k1", alg="ES256"), "Wrong or unsupported encoding algorithm")


@pytest.mark.parametrize(("token", "message"), [
    ("abc", "Expected 3 parts in JWT; got 1"),
    ("a.b.c.d", "Expected 3 parts in JWT; got 4"),
    ("a.b.c", "JWT cryptographic operation failed"),
    ("eyJhbGciOiJSUzI1NiJ9.!!!.c2ln", "JWT cryptographic operation failed"),
    ("e" * 20_000 + ".e.e", "JWT cryptographic operation failed"),
])
async def test_malformed(make_verifier: MakeVerifier, token: str, message: str) -> None:
    verifier = await make_verifier()
    await refused(verifier, token, message)


# --- the JWKS cache -------------------------------------------------------------------------------


async def test_unknown_kid_refetches_once_then_throttles(jwks: JwksServer, make_verifier: MakeVerifier,
                                                         rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    # the window (from the start of a fetch) must outlast the 0.2 s fetch below and the checks after it, with
    # room for a loaded machine: 0.3 s once left too little (the refetch check failed in CI)
    verifier = await make_verifier(jwks_min_refresh_s=1.0)
    assert jwks.requests == 1  # prefetched at start
    await asyncio.sleep(1.05)
    jwks.delay_s = 0.2  # so the concurrent requests below overlap the one fetch in flight
    tokens = [sign(rsa_keys[0], f"ghost-{i}") for i in range(20)]
    results = await asyncio.gather(*(verifier.verify(t) for t in tokens), return_exceptions=True)
    assert all(isinstance(r, Unauthenticated) and r.message == "No suitable key or wrong key type" for r in results)
    assert jwks.requests == 2  # one shared refetch
    await refused(verifier, sign(rsa_keys[0], "ghost-again"), "No suitable key or wrong key type")
    assert jwks.requests == 2  # within the throttle window: no refetch
    assert (await verifier.verify(sign(rsa_keys[0], "k1"))).app == "web"
    assert jwks.requests == 2


async def test_key_rotation(jwks: JwksServer, make_verifier: MakeVerifier, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    verifier = await make_verifier(jwks_min_refresh_s=0.1)
    await asyncio.sleep(0.15)
    jwks.keys = [public_jwk(rsa_keys[2], "k2")]  # the provider rotates: k1 is gone
    assert (await verifier.verify(sign(rsa_keys[2], "k2"))).subject == "user-42"
    assert jwks.requests == 2
    await refused(verifier, sign(rsa_keys[0], "k1"), "No suitable key or wrong key type")


async def test_last_good_keys_survive_an_outage(jwks: JwksServer, make_verifier: MakeVerifier,
                                                rsa_keys: list[rsa.RSAPrivateKey],
                                                caplog: pytest.LogCaptureFixture) -> None:
    verifier = await make_verifier(jwks_min_refresh_s=0, jwks_cache_s=1, jwks_timeout_s=0.5)
    jwks.stop()
    await asyncio.sleep(1.1)  # the cache is now stale, and the provider is down
    token = sign(rsa_keys[0], "k1")
    with caplog.at_level(logging.WARNING, logger="gatehouse.auth.jwt"):
        assert (await verifier.verify(token)).app == "web"
        await refused(verifier, sign(rsa_keys[1], "new-kid"), "No suitable key or wrong key type")
        assert (await verifier.verify(token)).app == "web"
        await asyncio.sleep(0.05)  # let the background refresh finish
    assert "could not be fetched" in caplog.text and "keeping the 1 last good key" in caplog.text
    assert token not in caplog.text


async def test_start_does_not_fail_when_the_provider_is_down(jwks: JwksServer, rsa_keys: list[rsa.RSAPrivateKey],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    url = jwks.url
    jwks.stop()
    config = AuthConfig.model_validate({"issuers": {"idp": {
        "issuer": ISS, "jwks_url": url, "algorithms": ["RS256"], "jwks_timeout_s": 0.5}}})
    verifier = JwtVerifier(config, APPS)
    with caplog.at_level(logging.WARNING, logger="gatehouse.auth.jwt"):
        await verifier.start()
    try:
        assert "has no keys yet" in caplog.text
        await refused(verifier, sign(rsa_keys[0], "k1", aud=None), "No suitable key or wrong key type")
    finally:
        await verifier.stop()


# --- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "complaint"), [
    ({"algorithms": ["none"]}, "never accepted"),
    ({"algorithms": ["RS256", "none"]}, "never accepted"),
    ({"algorithms": []}, "at least 1"),
    ({"algorithms": ["XS256"]}, "unsupported algorithm"),
    ({"algorithms": ["RS256", "HS256"], "secret": "env:X"}, "never both"),
    ({"algorithms": ["HS256"], "jwks_url": None}, "need 'secret'"),
    ({"algorithms": ["HS256"], "secret": "env:X"}, "need 'secret' (and no 'jwks_url')"),
    ({"jwks_url": None}, "need 'jwks_url'"),
    ({"jwks_url": None, "algorithms": ["HS256"], "secret": "hunter2-literal"}, "never written in the file"),
    ({"jwks_url": "http://idp.example.test/jwks"}, "https"),
    ({"clock_skew_s": 301}, "less than or equal to 300"),
    ({"apps": {"client": "Not An App"}}, "not an app name"),
    ({"surprise": 1}, "Extra inputs"),
])
def test_config_validation(settings: dict[str, Any], complaint: str) -> None:
    issuer = {"issuer": ISS, "jwks_url": "https://idp.example.test/jwks", "algorithms": ["RS256"], **settings}
    with pytest.raises(ValidationError, match=complaint.replace("(", r"\(").replace(")", r"\)")):
        IssuerConfig.model_validate(issuer)


def test_two_issuers_with_the_same_iss_are_refused() -> None:
    issuer = {"issuer": ISS, "jwks_url": "https://idp.example.test/jwks", "algorithms": ["RS256"]}
    with pytest.raises(ValidationError, match="same 'issuer'"):
        AuthConfig.model_validate({"issuers": {"a": issuer, "b": issuer}})


def test_short_or_missing_secret_is_a_project_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from gatehouse.errors import ProjectError

    config = AuthConfig.model_validate({"issuers": {"s": {
        "issuer": ISS, "secret": f"env:{SECRET_ENV}", "algorithms": ["HS256"]}}})
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(ProjectError, match=SECRET_ENV):
        JwtVerifier(config, APPS)
    monkeypatch.setenv(SECRET_ENV, "short")
    with pytest.raises(ProjectError, match="at least 32 bytes"):
        JwtVerifier(config, APPS)


def test_looks_like_jwt(rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    assert looks_like_jwt(sign(rsa_keys[0], "k1"))
    assert looks_like_jwt(hand_made({"alg": "none"}, claims(), None))
    assert not looks_like_jwt("gh_abcdefghij_" + "x" * 43)
    assert not looks_like_jwt("a.b")
    assert not looks_like_jwt("a.b.c.d")
    assert not looks_like_jwt("a b.c.d")
