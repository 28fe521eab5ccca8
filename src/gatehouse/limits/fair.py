"""Sharing the server fairly between apps: a bounded number of requests worked on at once, served by turns.

The gateway is one event loop. Past saturation every request of every app interleaves first come, first served
at every ``await``, and a database statement of one app waits for the database's CPU behind every statement
of the others; so a quiet app's latency follows a noisy app's load. ``quota.max_in_flight`` caps one app, but an
app without it (most) was free to fill the server.

**Work slots.** At most ``[server] max_active`` requests are *being answered* at once, all apps together (a slot
is taken in ``pipeline.identify``, after authentication and the app's own limits, and given back when the answer
is made: ``RequestLabels.release_work``, called by the middleware's ``finally``, so errors and clients that go
away give it back too). Above that, a request waits in its app's queue, which costs no CPU: the loop's ready
queue holds the steps of about ``max_active`` requests instead of everyone's. The default
(:func:`default_max_active`) is the largest app ``pool_size`` plus a statement group (``[server] group_statements``,
32), at least twice the pool: an app alone keeps its pool busy with a whole group waiting for the next free
connection, and two apps at full load each get half of that.
A much smaller bound gives an app a share below one slot: with ``max_active = 1`` a quiet app's second concurrent
request waits for the noisy app's slot, and once waited seconds for it (``bench/README.md``, tenth session).

**Whose turn.** The share of an app is ``max_active * weight / (sum of the weights of the apps with a request
being answered or queued)`` (``quota.weight``, default 1). An app holding fewer slots than its share goes at
once even when every slot is taken (the server then answers a few more than ``max_active`` for a moment: at
most one more per app, since the shares add up to ``max_active``); the apps above their share stop getting
slots until the total is back under ``max_active``. So a quiet app never queues behind a noisy one: it is under
its share whenever it sends less than its share. When a slot comes free and requests are queued, it goes to the
queued app holding the fewest slots per weight, and among equals to the one served longest ago (round robin):
max-min fairness in *slots held*, which is fairness in server time too (an app of slow requests holds its slots
longer, and gets fewer of them per second). This was chosen over counting requests (deficit round robin,
start-time fair queueing): a request's cost is not known before it runs, and the time it holds a slot is what
the others wait for.

**Refusing.** Fairness comes from the order, not from refusals: a saturating app queues (its clients see
latency, as they would from any full server). Only an app with ``[server] max_queued`` requests already queued
gets 429 (``TooManyInFlight``: it alone sends that many at once), and a request queued for longer than
``[server] pool_timeout_ms`` gets 504 (``PoolTimeout``, as if it had waited that long for a connection).

**Cost.** While a slot is free (or the app is under its share) :meth:`FairShare.enter` takes it without an
``await``: a dict lookup and three counters, 0.2 µs, and 0.25 µs to give it back (``bench/README.md``, tenth
session). ``fair_sharing = false`` keeps the counting and never queues (first come, first served, as before):
for A/B runs (``bench/noisy.py``).

**What it does not fix** (measured, ``bench/README.md``): with a noisy app saturating the CPU, the quiet app's p99
is about halved, but most of what is left is spent before its handler starts or after it ends (granian's
threads, new requests' turn on the loop, the kernel's run queue of a machine whose cores are all busy), where
no ordering of admitted requests reaches. Database-bound noise
costs the quiet app what PostgreSQL's shared CPU costs it; capping the statements of all apps together
(``max_active`` of 2 to 8) changed nothing measurable there, so no separate database gate was added.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import Callable

from gatehouse.errors import PoolTimeout, TooManyInFlight
from gatehouse.project import App, Project

Release = Callable[[], None]


class _Tenant:
    """One app's slots and queue."""

    __slots__ = ("active", "app", "busy", "fair", "leave", "queue", "served", "weight")

    def __init__(self, app: App, fair: FairShare) -> None:
        self.app = app
        self.fair = fair
        self.weight = app.config.quota.weight
        self.active = 0
        """Slots it holds."""
        self.queue: deque[asyncio.Future[None]] = deque()
        self.busy = False
        """Counted in the busy weight: it holds a slot or has a request queued."""
        self.served = 0
        """When a queued request of it last got a slot (the scheduler's turn counter): round robin among equals."""
        self.leave: Release = self._leave
        """Gives back one slot (bound once per app: nothing is allocated per request)."""

    def _leave(self) -> None:
        self.active -= 1
        fair = self.fair
        fair.active -= 1
        if fair.queued and fair.active < fair.max_active:
            fair._hand_over()
        if not self.active and not self.queue:
            self.busy = False
            fair._busy_weight -= self.weight


class FairShare:
    """``max_active`` work slots shared between apps by turns (see the module's docstring).

    ::

        release = fair.enter(app)  # at once: a slot was free, or the app is under its share
        if release is None:
            release = await fair.wait(app)  # queued: 429 when its queue is full, 504 after wait_s
        ...
        release()  # exactly once, when the answer is made
    """

    def __init__(self, max_active: int | None, *, wait_s: float = 5.0, max_queued: int = 1000) -> None:
        self.max_active = max_active if max_active is not None else sys.maxsize
        """``None``: no bound (fair sharing off): every request goes at once."""
        self.active = 0
        """Slots held, all apps together (may exceed ``max_active`` by apps under their share)."""
        self.queued = 0
        self.waited = 0
        """Requests that were queued (all time): how often the server was full."""
        self._wait_s = wait_s
        self._max_queued = max_queued
        self._tenants: dict[str, _Tenant] = {}
        self._waiting: list[_Tenant] = []
        """The apps with a request queued."""
        self._busy_weight = 0
        self._turn = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def off(cls) -> FairShare:
        return cls(None)

    @classmethod
    def for_project(cls, project: Project) -> FairShare:
        """As ``[server]`` says: ``max_active`` (default :func:`default_max_active`), or off."""
        server = project.config.server
        if not server.fair_sharing:
            return cls.off()
        bound = server.max_active if server.max_active is not None else default_max_active(project)
        return cls(bound, wait_s=server.pool_timeout_ms / 1000, max_queued=server.max_queued)

    def holding(self, app_name: str) -> int:
        """Slots the app holds now."""
        tenant = self._tenants.get(app_name)
        return 0 if tenant is None else tenant.active

    def enter(self, app: App) -> Release | None:
        """Take a slot if this request may go at once, and return what gives it back; ``None``: it must queue
        (:meth:`wait`, with no ``await`` in between)."""
        tenant = self._tenants.get(app.name)
        if tenant is None or tenant.app is not app:  # new, or reloaded (its weight may have changed)
            tenant = self._tenant(app)
        if self.active < self.max_active or self._under_share(tenant):
            if not tenant.busy:
                tenant.busy = True
                self._busy_weight += tenant.weight
            tenant.active += 1
            self.active += 1
            return tenant.leave
        return None

    def _under_share(self, tenant: _Tenant) -> bool:
        """Fewer slots than its share, and nothing of its own queued ahead of this request."""
        if tenant.queue:
            return False
        weight = self._busy_weight if tenant.busy else self._busy_weight + tenant.weight
        return tenant.active * weight < self.max_active * tenant.weight

    async def wait(self, app: App) -> Release:
        """Queue for a slot; returns what gives it back. Raises :class:`TooManyInFlight` (429) when the app
        already has ``max_queued`` requests queued, :class:`PoolTimeout` (504) after ``wait_s``."""
        tenant = self._tenants.get(app.name)
        if tenant is None or tenant.app is not app:
            tenant = self._tenant(app)
        if len(tenant.queue) >= self._max_queued:
            raise TooManyInFlight(f"Too many requests queued: this application has {len(tenant.queue)} waiting "
                                  "for the server", hint="Retry in 1 s, or send fewer requests at once.",
                                  headers={"Retry-After": "1"})
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        if not tenant.busy:
            tenant.busy = True
            self._busy_weight += tenant.weight
        if not tenant.queue:
            self._waiting.append(tenant)
        tenant.queue.append(turn)
        self.queued += 1
        self.waited += 1
        timer = loop.call_later(self._wait_s, self._expire, tenant, turn)
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                tenant.leave()  # given a slot just as it was cancelled: the next one gets it
            else:
                self._dequeue(tenant, turn)
            raise
        finally:
            timer.cancel()
        return tenant.leave

    def _tenant(self, app: App) -> _Tenant:
        tenant = self._tenants.get(app.name)
        if tenant is None:
            tenant = self._tenants[app.name] = _Tenant(app, self)
        else:  # the project was reloaded: same slots and queue, the new weight
            if tenant.busy:
                self._busy_weight += app.config.quota.weight - tenant.weight
            tenant.app, tenant.weight = app, app.config.quota.weight
        return tenant

    def _hand_over(self) -> None:
        """Free slots to the queued apps holding the fewest slots per weight (round robin among equals)."""
        while self.active < self.max_active and self._waiting:
            chosen = min(self._waiting, key=_order)
            turn = chosen.queue.popleft()
            self.queued -= 1
            if not chosen.queue:
                self._waiting.remove(chosen)
            if turn.done():  # cancelled a moment ago (its task will find it out of the queue already)
                if not chosen.queue and not chosen.active:
                    chosen.busy = False
                    self._busy_weight -= chosen.weight
                continue
            self._turn += 1
            chosen.served = self._turn
            chosen.active += 1
            self.active += 1
            turn.set_result(None)

    def _dequeue(self, tenant: _Tenant, turn: asyncio.Future[None]) -> None:
        """A queued request that gave up (timed out, or its client went away)."""
        try:
            tenant.queue.remove(turn)
        except ValueError:  # already taken out by _hand_over
            return
        self.queued -= 1
        if not tenant.queue:
            self._waiting.remove(tenant)
            if not tenant.active:
                tenant.busy = False
                self._busy_weight -= tenant.weight

    def _expire(self, tenant: _Tenant, turn: asyncio.Future[None]) -> None:
        if not turn.done():
            self._dequeue(tenant, turn)
            turn.set_exception(PoolTimeout(
                "Timed out waiting for a turn: the server is busy and this application has its share of it.",
                hint="Retry in 1 s, or send fewer requests at once.", headers={"Retry-After": "1"}))


def _order(tenant: _Tenant) -> tuple[float, int]:
    return tenant.active / tenant.weight, tenant.served


def default_max_active(project: Project) -> int:
    """The largest app pool plus one statement group, at least twice that pool.

    Requests waiting at an app's busy pool cost nothing until they run (a future each, not steps in the loop's
    ready queue), and the next free connection runs those of one statement together: the more may wait there,
    the fewer round trips and commits per request. Twice the pool, the bound before statement groups, left
    groups of three or four on the bench's point lookup; room for a whole group made them eight, the lookups 9-18 %
    faster, and PostgreSQL's CPU per read a fifth smaller (``bench/README.md``, seventeenth session). With groups off
    (``group_statements = 1``) it is twice the pool: an app alone keeps its pool busy, and two apps at full load
    each get a share as large as a pool. (A fixed number would cap an app with a large pool below it; the sum
    of the pools would never bind.)"""
    largest = max((app.config.quota.pool_size for app in project.apps.values()), default=4)
    return largest + max(largest, project.config.server.group_statements)
