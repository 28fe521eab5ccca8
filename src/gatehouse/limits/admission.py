"""Whether an app's request may go on: its rate limits, and how many of its requests may be in flight.

Both are decided right after authentication and before any database work (``pipeline.identify``):

* **Rate limits** (``[apps.x] quota = { rate = "50/s", burst = 100 }``, and a grant's own ``rate`` for its
  contract and actions) are GCRA limits (:mod:`.gcra`); a request is admitted only if every limit that applies
  admits it, and a refused request uses none of them. Every answer of a limited app carries the IETF
  ``RateLimit-Policy`` and ``RateLimit`` fields (draft-ietf-httpapi-ratelimit-headers-10: one policy per
  limit, ``q`` requests per ``w`` seconds; ``RateLimit`` reports the policy with the least left, ``r`` left
  and ``t`` seconds until it is whole again); a refusal is a 429 whose ``Retry-After`` and ``t`` name the
  same moment.
* **In flight** (``quota.max_in_flight``): at most that many of the app's requests are answered at once; the
  next ones wait up to ``[server] admission_wait_ms`` for a slot, then get 429. A noisy app queues behind
  itself instead of filling the server for everybody.

Without ``[redis]`` the limits are this process's own and :meth:`RateLimiter.check` always answers at once.
With a shared store (:mod:`.shared`: Redis, token leases, a local share while Redis is down) several instances
enforce one limit together; ``check`` still answers at once whenever this instance holds a token or a refusal,
and otherwise returns a coroutine to await (one Redis round trip, shared by the requests waiting for it)::

    headers = limiter.check(app, contract, actions)  # raises RateLimited (429)
    if not isinstance(headers, dict):
        headers = await headers  # raises RateLimited (429) too
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gatehouse.errors import RateLimited, TooManyInFlight
from gatehouse.limits.gcra import Decision, LocalGcra, Rate
from gatehouse.project import App

if TYPE_CHECKING:  # redis-py takes ~0.2 s to import: only a project with [redis] url pays for it
    from gatehouse.config import RedisConfig
    from gatehouse.limits.shared import SharedLimits


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    """What the headers call it: ``app``, or ``<contract>:<actions>`` for a grant's own limit."""
    rate: Rate

    @property
    def field(self) -> str:
        return f'"{self.name}";q={self.rate.count};w={self.rate.window}'


class Applying:
    """The limits that apply to one (app, contract, actions), with what every check of them needs worked out
    once: the keys and rates the store takes, and the ``RateLimit-Policy`` field. Compared and hashed by
    identity (a frozen dataclass would hash its nested dataclasses in Python on every request)."""

    __slots__ = ("keyed", "policies", "policy_field")

    def __init__(self, policies: Sequence[tuple[tuple[str, str], Policy]]) -> None:
        self.policies = tuple(policies)
        self.keyed: tuple[tuple[object, Rate], ...] = tuple((key, policy.rate) for key, policy in policies)
        self.policy_field = ", ".join(policy.field for _, policy in policies)

    def __bool__(self) -> bool:
        return bool(self.policies)


NO_LIMITS = Applying(())
Headers = dict[str, str]


class RateLimiter:
    """The rate limits of a project's apps, checked in this process, or shared with other instances through
    ``shared`` (which :meth:`start` connects and :meth:`stop` closes)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, shared: SharedLimits | None = None) -> None:
        self._clock = clock
        self._store = LocalGcra()
        self.shared = shared
        self._policies: dict[tuple[str, str | None, tuple[str, ...]], Applying] = {}
        """Which limits apply, per app, limited contract (None for any other: the path is the caller's to
        choose, so it never grows this) and actions."""
        self._limited: dict[str, tuple[bool, frozenset[str]]] = {}
        """Per app: has it a rate of its own, and which contracts have a grant with one."""

    @classmethod
    def from_config(cls, redis: RedisConfig) -> RateLimiter:
        """Limits shared through the Redis ``[redis] url`` names, or this process's own when it names none.
        Raises :class:`~gatehouse.errors.ProjectError` when the URL's environment variable is not set."""
        if redis.url is None:
            return cls()
        from gatehouse.limits.shared import SharedLimits

        return cls(shared=SharedLimits.from_config(redis))

    async def start(self) -> None:
        """Connect the shared store and start its heartbeat (never fails because of Redis)."""
        if self.shared is not None:
            await self.shared.start()

    async def stop(self) -> None:
        if self.shared is not None:
            await self.shared.stop()

    def follow(self) -> None:
        """A reloaded project: its limits from now on (what was used of an unchanged limit is kept)."""
        self._policies, self._limited = {}, {}
        if self.shared is not None:
            self.shared.follow()

    def _applying(self, app: App, contract: str | None,
                  actions: tuple[str, ...]) -> Applying:
        limited = self._limited.get(app.name)
        if limited is None:  # once per app: most requests of most apps need no more than this
            limited = self._limited[app.name] = (
                app.config.quota.rate is not None,
                frozenset(grant.contract for grant in app.config.grants if grant.rate is not None))
        if contract not in limited[1]:
            if not limited[0]:
                return NO_LIMITS
            contract = None
        key = (app.name, contract, actions)
        found = self._policies.get(key)
        if found is None:
            quota = app.config.quota
            chosen: list[tuple[tuple[str, str], Policy]] = []
            if quota.rate is not None:
                chosen.append(((app.name, "app"), Policy("app", Rate.parse(quota.rate, quota.burst))))
            for grant in app.config.grants:
                if grant.rate is not None and grant.contract == contract and set(actions) & set(grant.actions):
                    name = f"{grant.contract}:{'+'.join(grant.actions)}"
                    chosen.append(((app.name, name), Policy(name, Rate.parse(grant.rate, grant.burst))))
            found = self._policies[key] = Applying(chosen)
        return found

    def check(self, app: App, contract: str | None = None,
              actions: tuple[str, ...] = ()) -> Headers | Coroutine[Any, Any, Headers]:
        """The ``RateLimit`` header fields for an admitted request (empty when no limit applies); raises
        :class:`RateLimited` (429) for a refused one. With a shared store that must be asked first, a coroutine
        that does the same once awaited (never a Redis error: the store falls back to this instance's share)."""
        applying = self._applying(app, contract, actions)
        if not applying:
            return {}
        shared = self.shared
        if shared is None:
            return _answer(applying, self._store.check(applying.keyed, self._clock()))
        decisions = shared.check(applying.keyed)
        if decisions is None:
            return self._admit(applying, shared)
        return _answer(applying, decisions)

    @staticmethod
    async def _admit(applying: Applying, shared: SharedLimits) -> Headers:
        return _answer(applying, await shared.admit(applying.keyed))


def _answer(applying: Applying, decisions: Sequence[Decision]) -> Headers:
    """The fields of the tightest limit; or the 429 of the refusing limit that frees up last."""
    tightest: tuple[Decision, Policy] | None = None
    refused: tuple[Decision, Policy] | None = None
    for decision, (_, policy) in zip(decisions, applying.policies, strict=True):
        if not decision.allowed and (refused is None or decision.retry_after > refused[0].retry_after):
            refused = (decision, policy)
        if tightest is None or decision.remaining < tightest[0].remaining:
            tightest = (decision, policy)
    if refused is not None:
        decision, policy = refused
        wait = max(1, math.ceil(decision.retry_after))
        headers = _fields(applying, decision, policy, reset=wait)
        headers["Retry-After"] = str(wait)
        raise RateLimited(f"Too many requests: the limit of {policy.rate} ({policy.name}) is used up",
                          hint=f"Retry in {wait} s.", headers=headers)
    assert tightest is not None
    decision, policy = tightest
    return _fields(applying, decision, policy, reset=math.ceil(decision.reset_after))


def _fields(applying: Applying, decision: Decision, policy: Policy, *, reset: int) -> Headers:
    return {"RateLimit-Policy": applying.policy_field,
            "RateLimit": f'"{policy.name}";r={decision.remaining};t={reset}'}


class InFlight:
    """At most ``quota.max_in_flight`` requests of an app at once; the others wait up to ``wait_s``."""

    def __init__(self, wait_s: float) -> None:
        self._wait_s = wait_s
        self._slots: dict[str, tuple[int, asyncio.Semaphore]] = {}

    async def enter(self, app: App) -> Callable[[], None] | None:
        """Take a slot: returns what gives it back (None when the app has no bound); raises
        :class:`TooManyInFlight` (429) when none frees up in time."""
        bound = app.config.quota.max_in_flight
        if bound is None:
            return None
        held = self._slots.get(app.name)
        if held is None or held[0] != bound:  # new, or its bound changed with a reload: a new set of slots
            held = self._slots[app.name] = (bound, asyncio.Semaphore(bound))
        slots = held[1]
        if slots.locked():
            try:
                await asyncio.wait_for(slots.acquire(), self._wait_s)
            except TimeoutError:
                raise TooManyInFlight(f"Too many requests in flight: this application may have {bound} at once",
                                      hint="Retry in 1 s, or send fewer requests at once.",
                                      headers={"Retry-After": "1"}) from None
        else:
            await slots.acquire()
        return slots.release
