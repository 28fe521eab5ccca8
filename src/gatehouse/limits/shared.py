"""Rate limits shared by several gatehouse instances through Redis, at almost the cost of local ones.

With ``[redis] url`` set, an app's ``"50/s"`` is 50 a second across every instance, not per instance. The
limit is GCRA (:mod:`.gcra`) with its TAT in Redis, updated by one Lua script (``redis_gcra.lua``, EVALSHA,
loaded again on NOSCRIPT) on Redis's own clock; several limits of one request are admitted together or not at
all, and a refusal writes nothing. A redis-py call costs more CPU (~200 µs) than a whole request (~110 µs), so
requests do not call Redis: the instance *leases* tokens in chunks and spends them locally (:mod:`.leases`);
only a request that finds no token (and no remembered refusal) awaits a call, which every request of that limit
waiting at the time shares. When Redis is slow or down the breaker (:mod:`.breaker`) opens and every instance
enforces its share of each limit, ``1 / live instances``, in process; nothing about Redis ever fails a request.

**Error bound** (Redis healthy, breaker closed): over any window of ``w`` seconds, all instances together
admit at most ``burst + rate x (w + lease_ttl)`` requests of a limit, where exact GCRA admits ``burst + rate x
w``. Argument:

1. *Redis grants at most ``burst + rate x u`` tokens in any span of ``u`` seconds of its clock.* The script
   grants ``g`` tokens at time ``s`` only if ``max(TAT, s) + g·T <= s + burst·T`` (T = 1/rate) and then sets
   ``TAT = max(TAT, s) + g·T``; the TAT never moves back. Let ``n`` tokens be granted in ``[a, a + u]``: the
   first grant starts from a TAT of at least ``a``, each token adds ``T``, so after the last one
   ``TAT >= a + n·T``, and that grant needed ``TAT <= (a + u) + burst·T``. Hence ``n <= burst + u / T``.
   (The script rounds the TAT *up* to whole microseconds, which only admits less.)
2. *A token is spent within ``lease_ttl`` after Redis granted it.* A lease expires ``lease_ttl`` after the call
   was *sent*, which is before the script ran; it can be spent only after the reply arrived, which is after.
   So a request admitted at ``t`` spends a token granted at some ``s`` in ``[t - lease_ttl, t]``.
3. Requests admitted in ``[x, x + w]`` therefore spend tokens granted in ``[x - lease_ttl, x + w]``, a span of
   ``w + lease_ttl``: by (1) at most ``burst + rate x (w + lease_ttl)`` of them. ∎

(``lease_ttl`` is the effective one, at least twice the timeout so that a reply on time has half its lease
left. Instance clocks only measure durations of at most ``lease_ttl``; drift of a few ppm is ignored, and
Redis's clock must not jump.) The bound holds whatever the lease sizes; the price is at most ``rate x
lease_ttl`` (a fifth of a second's worth with the default 0.2 s). Leases are at most ``burst / (2 x live)``
tokens (plus the requests already waiting, which spend theirs at once), so the instances together hold at most
half of the burst, and a limit too small for that leases one token at a time: exact GCRA, up to the round trip.
Tokens that expire unspent are lost (under-admission, not over). While the breaker is open, each instance admits at most
``burst/live + rate/live x w``, together ``burst + rate x w`` when the live count is right. What an instance
admitted on its own share is *owed*: its next call to Redis moves the shared TAT forward by that many
requests first, so the limit does not hand out a fresh burst when Redis is back; a window that spans the
switch may still see both a lease and the local share, up to one burst more.

Counters for Prometheus are in :attr:`SharedLimits.stats` (plus :attr:`SharedLimits.breaker_state`,
``breaker_opens`` and ``live_instances``).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeout

from gatehouse.background import stop_tasks
from gatehouse.config import RedisConfig
from gatehouse.limits.breaker import Breaker
from gatehouse.limits.gcra import Decision, LocalGcra, Rate
from gatehouse.limits.leases import Lease, contended, decide, running_low
from gatehouse.redis_connection import open_redis
from gatehouse.secrets import resolve_secret

Limits = Sequence[tuple[object, Rate]]
"""What a request is under: ``(key, rate)`` per limit; a key is ``(app, policy)`` (any hashable works)."""
ROUNDS = 4
"""Lease calls a request waits for before it is refused (the tokens went to the others waiting each time)."""
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
return redis.call('ZCARD', KEYS[1])
"""
"""Say this instance is alive (scored by Redis's clock, in ms) and count those seen in the last window."""


class _Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


GCRA = _Script(resources.files("gatehouse.limits").joinpath("redis_gcra.lua").read_text(encoding="utf-8"))
BEAT = _Script(HEARTBEAT)


@dataclass(slots=True)
class SharedStats:
    """Counts since start, for Prometheus (each a counter)."""

    lease_calls: int = 0
    """Script calls that Redis answered."""
    tokens_leased: int = 0
    waits: int = 0
    """Decisions that had to await a lease call (the rest were decided without an ``await``)."""
    degraded: int = 0
    """Decisions made by this instance's share because Redis was not asked (breaker open) or failed."""
    redis_errors: int = 0
    """Calls that failed or timed out."""
    starved: int = 0
    """Requests that waited ``ROUNDS`` lease calls without a token (taken by the others waiting) and were refused."""



class SharedLimits:
    """The shared store of :class:`~gatehouse.limits.admission.RateLimiter`: check, lease, fall back."""

    def __init__(self, url: str, *, timeout_ms: int = 50, key_prefix: str = "gatehouse:", lease_ttl: float = 0.2,
                 horizon: float = 0.1, heartbeat_s: float = 1.0, live_window_s: float = 3.0,
                 backoff_s: float = 0.5, max_backoff_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._url = url
        self._timeout = timeout_ms / 1000
        self._prefix = key_prefix
        self._ttl = max(lease_ttl, 2 * self._timeout)  # a reply may arrive up to a timeout after the call
        self._horizon = min(horizon, self._ttl)
        self._beat_every = heartbeat_s
        self._live_window_ms = int(live_window_s * 1000)
        self._clock = clock
        self._breaker = Breaker(clock, backoff_s=backoff_s, max_backoff_s=max_backoff_s)
        self._client: aioredis.Redis | None = None
        self._instance = uuid.uuid4().hex
        self._leases: dict[object, Lease] = {}
        self._by_limits: dict[int, tuple[Limits, list[Lease]]] = {}
        """``id(limits)`` → (limits, their leases): the limiter passes the same tuple for the same policies."""
        self._fallback = LocalGcra()
        self._shares: dict[tuple[Rate, int], Rate] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._beating: asyncio.Task[None] | None = None
        self._stopping = False
        self.live_instances = 1
        """Instances that said they were alive within the last window (the last count read; 1 until one)."""
        self.stats = SharedStats()

    @classmethod
    def from_config(cls, config: RedisConfig) -> SharedLimits | None:
        """The shared store ``[redis]`` names, or None when it names none (limits stay in this process)."""
        url = resolve_secret(config.url, what="[redis] url")
        if url is None:
            return None
        return cls(url, timeout_ms=config.timeout_ms, key_prefix=config.key_prefix)

    @property
    def breaker_state(self) -> str:
        return self._breaker.state.value

    @property
    def breaker_opens(self) -> int:
        return self._breaker.opened

    async def start(self) -> None:
        """Connect lazily and say this instance is alive (once now, bounded by the timeout, then every
        ``heartbeat_s`` in the background). Never fails because of Redis: the limits then start local."""
        self._stopping = False
        self._client = open_redis(self._url, self._timeout)
        await self._beat()
        self._beating = asyncio.get_running_loop().create_task(self._heartbeat())

    async def stop(self) -> None:
        """End the heartbeat and the calls in flight, and leave the live count. The heartbeat also stops at its
        flag (a cancel can be lost: :mod:`gatehouse.background`)."""
        self._stopping = True
        tasks = [*self._tasks, *([self._beating] if self._beating else [])]
        await stop_tasks(tasks)
        client, self._client = self._client, None
        if client is None:
            return
        if self._breaker.closed:  # leave the live count at once (best effort: it also ages out)
            try:
                run: Callable[..., Awaitable[Any]] = client.execute_command  # (redis-py leaves it untyped)
                async with asyncio.timeout(self._timeout):
                    await run("ZREM", self._prefix + "instances", self._instance)
            except Exception:  # a Redis that is gone is as good as an answer here
                pass
        await client.aclose(close_connection_pool=True)

    def follow(self) -> None:
        """A reloaded project: new policy tuples (leases of unchanged keys and rates are kept)."""
        self._by_limits = {}

    # --- deciding --------------------------------------------------------------------------------------------

    def check(self, limits: Limits) -> list[Decision] | None:
        """Decide from what this instance holds (leases, a remembered refusal, or its share while the breaker is
        open), with no ``await``; None when a lease call is needed: then :meth:`admit`."""
        now = self._clock()
        if not self._breaker.closed:
            if self._breaker.permit():  # open long enough: try Redis in the background, decide here meanwhile
                self._lease_later(self._leases_of(limits, now), trial=True)
            return self._degraded(limits, now)
        leases = self._leases_of(limits, now)
        for lease in leases:
            lease.demand += 1
        decided = decide(leases, now)
        if decided is not None:
            low = running_low(leases, now)
            if low:
                self._lease_later(low)
        return decided

    async def admit(self, limits: Limits) -> list[Decision]:
        """Decide a request that :meth:`check` could not: wait for a lease (shared with every request of the
        same limits that waits too), bounded by the timeout; on any failure, decide by the local share."""
        self.stats.waits += 1
        leases = self._leases_of(limits, self._clock())
        for lease in leases:
            lease.waiting += 1
        try:
            for _ in range(ROUNDS):
                now = self._clock()
                if not self._breaker.closed:
                    return self._degraded(limits, now)
                decided = decide(leases, now)
                if decided is not None:
                    return decided
                short = [lease for lease in leases if lease.available(now) <= 0]
                pending = {lease.inflight for lease in short if lease.inflight is not None}
                if not pending:
                    pending = {self._lease_later(short)}
                await asyncio.wait(pending)  # never cancels the call: others may wait for it too
                if not all(not task.cancelled() and task.exception() is None and task.result() for task in pending):
                    return self._degraded(limits, self._clock())
            now = self._clock()
            decided = decide(leases, now)  # the last call's tokens, if any are still here
            if decided is not None:
                return decided
            self.stats.starved += 1  # the tokens went to the others waiting: used up for now (not a fallback)
            return contended(leases, now)
        finally:
            for lease in leases:
                lease.waiting -= 1

    def _leases_of(self, limits: Limits, now: float) -> list[Lease]:
        found = self._by_limits.get(id(limits))
        if found is not None and found[0] is limits:
            return found[1]
        leases = []
        for key, rate in limits:
            lease = self._leases.get(key)
            if lease is None or lease.rate != rate:
                lease = self._leases[key] = Lease(self._redis_key(key), rate, now)
            leases.append(lease)
        self._by_limits[id(limits)] = (limits, leases)
        return leases

    def _redis_key(self, key: object) -> str:
        """``<prefix>rl:{<app>}:<policy>``: the app in braces, so that every key of one request hashes to the
        same Redis Cluster slot (a script may only touch keys of one slot)."""
        if isinstance(key, tuple) and key:
            first, *rest = (str(part) for part in key)
            return f"{self._prefix}rl:{{{first}}}:{':'.join(rest)}"
        return f"{self._prefix}rl:{{{key}}}"

    def _degraded(self, limits: Limits, now: float) -> list[Decision]:
        self.stats.degraded += 1
        live = self.live_instances
        shares = [(key, self._share(rate, live)) for key, rate in limits] if live > 1 else limits
        decisions = self._fallback.check(shares, now)
        if all(decision.allowed for decision in decisions):  # admitted: owed to Redis when it is back
            for lease in self._leases_of(limits, now):
                lease.owed += 1
        return decisions

    def _share(self, rate: Rate, live: int) -> Rate:
        """This instance's part of ``rate``: the same count over ``live`` times the window, burst ÷ live."""
        share = self._shares.get((rate, live))
        if share is None:
            share = self._shares[(rate, live)] = Rate(rate.count, rate.window * live, max(1, rate.burst // live))
        return share

    # --- Redis -----------------------------------------------------------------------------------------------

    def _lease_later(self, leases: list[Lease], *, trial: bool = False) -> asyncio.Task[bool]:
        """Start one script call leasing tokens of ``leases`` (it is theirs in flight until it ends)."""
        task = asyncio.get_running_loop().create_task(self._lease(leases, trial))
        for lease in leases:
            lease.inflight = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _lease(self, leases: list[Lease], trial: bool) -> bool:
        task = asyncio.current_task()
        try:
            now = self._clock()
            keys: list[str] = []
            args: list[str] = []
            owed = [lease.owed for lease in leases]
            for lease, paying in zip(leases, owed, strict=True):
                keys.append(lease.key)
                args.extend((*lease.args, str(lease.size(now, self._horizon, self.live_instances)), str(paying)))
            sent = self._clock()
            reply = await self._call(GCRA, keys, args, trial=trial)
            if reply is None:
                return False
            received = self._clock()
            try:
                if len(reply) != 1 + 4 * len(leases):
                    raise ValueError(len(reply))
                answers = [[int(x) for x in reply[1 + 4 * i: 5 + 4 * i]] for i in range(len(leases))]
            except (TypeError, ValueError, IndexError):  # not our script's reply: as good as no reply
                self.stats.redis_errors += 1
                self._breaker.failed("unexpected reply", timeout=False, share=self.live_instances)
                return False
            self.stats.lease_calls += 1
            for lease, paid in zip(leases, owed, strict=True):
                lease.owed -= paid
            for lease, (granted, _, retry_us, reset_us) in zip(leases, answers, strict=True):
                lease.leased(granted, retry_us, reset_us, sent, received, self._ttl)
                self.stats.tokens_leased += granted
            return True
        finally:
            for lease in leases:
                if lease.inflight is task:
                    lease.inflight = None

    async def _call(self, script: _Script, keys: list[str], args: list[str], *, trial: bool = False) -> Any:
        """Run ``script``; its reply, or None when Redis was not asked (breaker) or failed (counted, breaker
        told). Never raises for a Redis problem, and never takes longer than the timeout."""
        client = self._client
        if client is None or not (trial or self._breaker.permit()):
            return None
        run: Callable[..., Awaitable[Any]] = client.execute_command  # (redis-py leaves it untyped)
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    reply = await run("EVALSHA", script.sha, len(keys), *keys, *args)
                except NoScriptError:  # a restarted or flushed Redis: load it once more
                    await run("SCRIPT", "LOAD", script.source)
                    reply = await run("EVALSHA", script.sha, len(keys), *keys, *args)
        except Exception as error:  # any failure of the store means: decide locally
            self.stats.redis_errors += 1
            self._breaker.failed(type(error).__name__, timeout=isinstance(error, TimeoutError | RedisTimeout),
                                 share=self.live_instances)
            return None
        self._breaker.succeeded()
        return reply

    async def _beat(self) -> None:
        count = await self._call(BEAT, [self._prefix + "instances"], [self._instance, str(self._live_window_ms)])
        if isinstance(count, int):
            self.live_instances = max(1, count)

    async def _heartbeat(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._beat_every)
            await self._beat()

