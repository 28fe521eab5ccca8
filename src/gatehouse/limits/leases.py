"""Token leases: tokens an instance took from a shared GCRA limit in one Redis call, spent here one per request.

A redis-py call costs more CPU than a whole gatehouse request, so an instance must not ask Redis for every
request. Instead it *leases* ``k`` tokens at once (the shared TAT moves ``k`` intervals ahead, only if they fit)
and admits the next ``k`` requests of that limit locally, at dict-lookup cost. The price is accuracy, and it is
bounded (:mod:`.shared` proves the bound) because

* a lease *expires* ``lease_ttl`` after the call that took it was sent: a token is spent within ``lease_ttl`` of
  the moment Redis handed it out, or never;
* ``k`` follows what this instance spends of the limit: about what it would spend in the next ``horizon``
  seconds (from a running estimate of its demand), at least 1, and at most ``burst / (2 x live instances)``, so
  the instances together never hold more than half the burst; a quiet limit leases one token at a time, which
  is exact GCRA (the token is spent the moment it arrives);
* requests waiting for the same lease are counted into it (they spend their tokens on arrival, so asking for
  them is exact too);
* a refusal from Redis ("limited for t seconds") is remembered: requests are refused here until then without
  a call (an attacker far above the limit costs a dict lookup, not a round trip). It is held a little longer
  (up to ``HOLD``) when this instance leases several tokens at a time, so it comes back for a useful lease, not
  a single token: under overload that is one call per lease instead of one per token.

The ``RateLimit`` header values come from Redis's last reply plus what was spent here since: remaining = the
tokens still leased here + what Redis would still lease (estimated from its TAT as of the reply, growing as the
limit rests), reset = until that TAT.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

from gatehouse.limits.gcra import EPSILON, Decision, Rate

US = 1_000_000
"""Microseconds a second: the script's unit (Redis TIME is seconds + microseconds)."""
HOLD = 0.05
"""At most this much longer than Redis said is a refusal held, to come back for more than one token."""


class Lease:
    """What this instance knows of one shared limit: its leased tokens, its refusal, Redis's last TAT."""

    __slots__ = ("args", "burst", "capacity", "chunks", "demand", "inflight", "interval", "key", "limited_until",
                 "owed", "rate", "rate_est", "server_tat", "since", "tokens", "waiting", "want")

    def __init__(self, key: str, rate: Rate, now: float) -> None:
        self.key = key
        """The Redis key of its TAT."""
        self.rate = rate
        self.interval = rate.interval
        self.capacity = rate.capacity
        self.burst = rate.burst
        self.args = (repr(rate.interval * US), repr(rate.capacity * US))
        """The script's arguments for this limit (without the tokens wanted), formatted once."""
        self.chunks: list[list[float]] = []
        """Leases not yet spent: ``[expires, tokens]``, oldest first."""
        self.tokens = 0
        """Tokens in ``chunks`` (expired ones included until :meth:`available` drops them)."""
        self.limited_until = 0.0
        """Refuse here until then (Redis said so)."""
        self.server_tat = now
        """Redis's TAT after its last reply, on this process's monotonic clock."""
        self.demand = 0
        """Checks of this limit since ``since`` (admitted or not): what the lease size follows."""
        self.since = now
        self.rate_est = 0.0
        """Checks per second, smoothed."""
        self.want = 1
        """The size of the last lease asked for."""
        self.inflight: asyncio.Task[bool] | None = None
        """The Redis call leasing tokens of this limit now, shared by every request that needs one."""
        self.waiting = 0
        """Requests waiting for a lease of this limit."""
        self.owed = 0
        """Requests this instance admitted on its own share while Redis was away, not yet told to Redis: the next
        call moves the shared TAT forward by them, so an outage does not hand out a fresh burst afterwards."""

    def available(self, now: float) -> int:
        """Tokens that may still be spent (expired leases are dropped: never spent late)."""
        chunks = self.chunks
        while chunks and (chunks[0][0] <= now or chunks[0][1] <= 0):
            self.tokens -= int(chunks.pop(0)[1])
        return self.tokens

    def spend(self) -> None:
        """One token of the oldest lease (call after :meth:`available` said there is one)."""
        self.chunks[0][1] -= 1
        self.tokens -= 1

    def remaining(self, now: float) -> int:
        """Requests of this limit that would still be admitted at once: here, then by Redis."""
        ahead = self.server_tat - now
        if ahead < 0:
            ahead = 0.0
        free = math.floor((self.capacity - ahead) / self.interval + EPSILON)
        return self.tokens + (free if free > 0 else 0)

    def reset_after(self, now: float) -> float:
        ahead = self.server_tat - now
        return ahead if ahead > 0 else 0.0

    def size(self, now: float, horizon: float, live: int) -> int:
        """How many tokens to ask for: this instance's demand over ``horizon``, within ``[1, burst/(2 live)]``;
        the requests already waiting for it always fit (they spend their tokens at once)."""
        elapsed = now - self.since
        if elapsed >= 0.005:
            measured = self.demand / elapsed
            self.rate_est = measured if self.rate_est == 0 else (self.rate_est + measured) / 2
            self.demand, self.since = 0, now
        cap = self.burst // (2 * live)
        want = math.ceil(self.rate_est * horizon)
        want = max(1, min(want, cap))
        waiting = min(self.waiting, self.burst)
        self.want = want if want >= waiting else waiting
        return self.want

    def leased(self, granted: int, retry_us: int, reset_us: int, sent: float, received: float, ttl: float) -> None:
        """Take in Redis's reply to a call sent at ``sent`` and answered at ``received`` (monotonic). What Redis
        would still lease is not kept: :meth:`remaining` derives it from the TAT, as time passes."""
        if granted > 0:
            chunk = [sent + ttl, float(granted)]
            if self.chunks and self.chunks[-1][0] > chunk[0]:  # replies can overtake each other
                self.chunks.insert(0, chunk)
            else:
                self.chunks.append(chunk)
            self.tokens += granted
        self.server_tat = received + reset_us / US
        if retry_us > 0:  # held until a lease of the usual size fits, not one token (briefly: the header says it)
            self.limited_until = received + retry_us / US + min((self.want - 1) * self.interval, HOLD)


def decide(leases: Sequence[Lease], now: float) -> list[Decision] | None:
    """Admit a request from the leases held here (one token of every limit), or refuse it because Redis said
    one of its limits is used up (nothing spent of the others); None when Redis must be asked first."""
    short = False
    for lease in leases:
        if lease.tokens <= 0 or lease.available(now) <= 0:
            if lease.limited_until > now:
                return _refused(leases, now)
            short = True
    if short:
        return None
    decisions = []
    for lease in leases:
        lease.spend()
        decisions.append(Decision(True, lease.remaining(now), 0.0, lease.reset_after(now)))
    return decisions


def _refused(leases: Sequence[Lease], now: float) -> list[Decision]:
    decisions = []
    for lease in leases:
        wait = lease.limited_until - now
        if wait > 0 and lease.available(now) <= 0:
            decisions.append(Decision(False, 0, wait, max(wait, lease.reset_after(now))))
        else:
            decisions.append(Decision(True, lease.remaining(now), 0.0, lease.reset_after(now)))
    return decisions


def contended(leases: Sequence[Lease], now: float) -> list[Decision]:
    """Refuse a request that waited several lease calls and found every token taken by the requests waiting
    with it: the limit is used up at this moment (a 429 for about one interval), and nothing is spent. Admitting
    it from the local share instead would add that share on top of what Redis granted everyone. Only for a
    request :func:`decide` could not admit (at least one lease is short): the others' "allowed" says only that
    they did not refuse it."""
    decisions = []
    for lease in leases:
        if lease.available(now) <= 0:
            decisions.append(Decision(False, 0, lease.interval, max(lease.interval, lease.reset_after(now))))
        else:
            decisions.append(Decision(True, lease.remaining(now), 0.0, lease.reset_after(now)))
    return decisions


def running_low(leases: Sequence[Lease], now: float) -> list[Lease]:
    """Leases of several tokens down to half of their size, with no call for more under way and no refusal to
    wait out: lease the next ones now, in the background, so that a steady stream seldom waits for Redis."""
    return [lease for lease in leases if lease.want > 1 and lease.tokens <= lease.want // 2
            and lease.inflight is None and lease.limited_until <= now]
