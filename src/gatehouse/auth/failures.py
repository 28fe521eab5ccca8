"""Failed authentication is throttled per caller and per failing credential, never for a good credential.

A request's credentials are always checked first (in memory: the key ring and the JWT verifier, no database
work). A credential that is valid passes, however many failures came from the same address: behind a load
balancer or a corporate NAT one address is many callers, and one of them typing a wrong key must not lock the
others out (as an address-wide block would). Failures are counted per client address and per presented
credential (a key's public id, or a digest of a token); once either has failed ``per_minute`` times within a
minute, its further failures are answered 429 with ``Retry-After`` instead of 401, which tells a misconfigured
client (a revoked key still deployed on a hundred pods) to back off, and makes a flood visible in metrics and
the audit.

Why failures are not refused *before* the check: that would lock out the good callers behind the same address,
and it would not protect the keys anyway: a key's secret has 256 bits and a token is signed, so guessing either
online is hopeless; what the throttle bounds is the noise and cost of callers that keep failing.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from gatehouse.auth.keys import split_key
from gatehouse.errors import TooManyFailures

__all__ = ["FailureThrottle", "TooManyFailures", "credential_id"]  # the 429 lives in the error tree


def credential_id(headers: Mapping[str, str]) -> str | None:
    """What identifies the presented credential without being secret: a key's public id, or a digest of a token
    (never the token). None when nothing was presented."""
    apikey = headers.get("apikey", "").strip()
    _, _, bearer = headers.get("authorization", "").partition(" ")
    presented = apikey or bearer.strip()
    if not presented:
        return None
    parts = split_key(presented)
    if parts is not None:
        return f"key:{parts[0]}"
    return "token:" + hashlib.sha256(presented.encode("utf-8", "replace")).hexdigest()[:24]


class FailureThrottle:
    def __init__(self, per_minute: int) -> None:
        self._limit = RateLimitItemPerMinute(per_minute)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def failed(self, client: str, credential: str | None) -> TooManyFailures | None:
        """Count one failed authentication; the 429 to answer instead of 401 when this client or this
        credential has failed too often within the minute, else None."""
        over = [key for key in (f"client:{client}", credential) if key is not None
                and not self._limiter.hit(self._limit, key)]
        if not over:
            return None
        reset = max(self._limiter.get_window_stats(self._limit, key).reset_time for key in over)
        wait = max(1, math.ceil(reset - time.time()))
        return TooManyFailures("Too many failed authentication attempts", headers={"Retry-After": str(wait)},
                               hint=f"Wait {wait} s; check the key or token before retrying.")
