"""Alert state in PostgreSQL: which rule and subject is firing, and which webhooks have heard of its last change.

One row per rule and subject in ``gatehouse.alert_state`` of the project's first database (where the keys and
the audit are). A transition is *claimed* by one conditional statement, so that among several instances (or
one restarted) exactly one sends it:

* firing: ``INSERT ... ON CONFLICT DO UPDATE ... WHERE state <> 'firing' RETURNING``;
* resolved: ``UPDATE ... WHERE state = 'firing' RETURNING``.

A second instance racing for the same row waits for the first one's row lock, then finds the condition false
and gets no row back. The claimer holds a *lease* on the row's delivery; ``delivered`` lists the webhooks that
acknowledged the current state. A row whose lease ran out while a webhook is still missing (the claimer died,
or its retries ran out) is claimed again by :meth:`AlertStore.claim_redelivery`, so a notification claimed is
sent at least once; receivers dedupe by its id.

The table is created on first use by the database's owner (the login of the database URL), who also runs
these statements: the authenticator, which serves requests, has no privilege on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import asyncpg
import orjson

from gatehouse.db.faults import BROKEN, CONNECT_ERRORS
from gatehouse.errors import DatabaseUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
QUERY_TIMEOUT_S = 5.0
DDL_LOCK_KEY = 0x67616C7274  # "galrt": concurrent CREATE TABLE IF NOT EXISTS can collide in pg_type

ALERT_STATE_DDL = """
CREATE SCHEMA IF NOT EXISTS gatehouse;
CREATE TABLE IF NOT EXISTS gatehouse.alert_state (
    rule         text NOT NULL,
    subject      text NOT NULL,
    state        text NOT NULL CHECK (state IN ('firing', 'resolved')),
    episode      text NOT NULL,
    labels       jsonb NOT NULL DEFAULT '{}',
    value        double precision,
    summary      text NOT NULL DEFAULT '',
    started_at   timestamptz NOT NULL,
    changed_at   timestamptz NOT NULL,
    delivered    text[] NOT NULL DEFAULT '{}',
    lease_until  timestamptz,
    PRIMARY KEY (rule, subject)
);
"""

_CLAIM_FIRING = """
INSERT INTO gatehouse.alert_state AS s
    (rule, subject, state, episode, labels, value, summary, started_at, changed_at, delivered, lease_until)
VALUES ($1, $2, 'firing', $3, $4::jsonb, $5, $6, coalesce($7, now()), now(), $8::text[],
        CASE WHEN $9::float8 IS NULL THEN NULL ELSE now() + $9::float8 * interval '1 second' END)
ON CONFLICT (rule, subject) DO UPDATE
SET state = 'firing', episode = EXCLUDED.episode, labels = EXCLUDED.labels, value = EXCLUDED.value,
    summary = EXCLUDED.summary, started_at = EXCLUDED.started_at, changed_at = now(),
    delivered = EXCLUDED.delivered, lease_until = EXCLUDED.lease_until
WHERE s.state <> 'firing'
RETURNING episode, labels, value, summary, started_at, changed_at
"""

_CLAIM_RESOLVED = """
UPDATE gatehouse.alert_state
SET state = 'resolved', value = $3, summary = $4, changed_at = now(), delivered = '{}',
    lease_until = now() + $5::float8 * interval '1 second'
WHERE rule = $1 AND subject = $2 AND state = 'firing'
RETURNING episode, labels, value, summary, started_at, changed_at
"""

_DELIVERED = """
UPDATE gatehouse.alert_state
SET delivered = array_append(delivered, $5),
    lease_until = CASE WHEN array_append(delivered, $5) @> $6::text[] THEN NULL ELSE lease_until END
WHERE rule = $1 AND subject = $2 AND episode = $3 AND state = $4 AND NOT ($5 = ANY (delivered))
"""

_DUE = """
SELECT rule, subject, state, episode, labels, value, summary, started_at, changed_at, delivered, lease_until
FROM gatehouse.alert_state WHERE lease_until < now() ORDER BY changed_at LIMIT 100
"""

_RELEASE_LEASE = """
UPDATE gatehouse.alert_state SET lease_until = CASE WHEN $4 THEN NULL ELSE now() + $5::float8 * interval '1 second' END
WHERE rule = $1 AND subject = $2 AND lease_until = $3
RETURNING rule
"""


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of state this instance claimed (or found owed), to be sent to the rule's webhooks."""

    rule: str
    subject: str
    state: str
    episode: str
    labels: dict[str, str]
    value: float | None
    summary: str
    started_at: datetime
    changed_at: datetime
    delivered: tuple[str, ...] = ()


def _transition(rule: str, subject: str, state: str, row: asyncpg.Record,
                delivered: Sequence[str] = ()) -> Transition:
    labels = row["labels"]
    return Transition(rule, subject, state, row["episode"],
                      orjson.loads(labels) if isinstance(labels, str | bytes) else dict(labels),
                      row["value"], row["summary"], row["started_at"], row["changed_at"], tuple(delivered))


class OwnerLink:
    """One connection of our own to a database, as its owner, opened on first use and again after it broke.

    Statements run one at a time, each within :data:`QUERY_TIMEOUT_S`; any failure to reach the database is
    raised as :class:`DatabaseUnavailable` (and the connection is dropped, to be opened anew next time)."""

    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]], name: str) -> None:
        self._connect = connect
        self.name = name
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._failure = ""
        """Why logging in failed in this round (see :meth:`new_round`)."""

    def new_round(self) -> None:
        """Allow a login again. Within one round (an evaluation reads several signals of a database) a failed
        login is not tried again, so a database that does not answer costs one timeout, not one per signal."""
        self._failure = ""

    async def run(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``work(conn)``; run once more on a new connection if the kept one turns out dead (the server
        restarted, or ended the session): a statement that met a dead connection had no effect."""
        async with self._lock:
            for attempt in (1, 2):
                retry = attempt == 1
                if self._conn is None or self._conn.is_closed():
                    self._conn, retry = None, False
                    if self._failure:  # it failed in this round already: the other signals do not wait again
                        raise DatabaseUnavailable(f"database {self.name}: {self._failure}")
                    try:
                        async with asyncio.timeout(QUERY_TIMEOUT_S):
                            self._conn = await self._connect()
                    except (*CONNECT_ERRORS, DatabaseUnavailable) as exc:
                        self._failure = type(exc).__name__
                        raise DatabaseUnavailable(f"database {self.name}: {self._failure}") from None
                try:
                    async with asyncio.timeout(QUERY_TIMEOUT_S):
                        return await work(self._conn)
                except TimeoutError:
                    self._drop()  # cut off mid-statement: its state is unknown
                    raise DatabaseUnavailable(f"database {self.name}: no answer in {QUERY_TIMEOUT_S:g} s") from None
                except BROKEN as exc:
                    self._drop()
                    if not retry:
                        raise DatabaseUnavailable(f"database {self.name}: {type(exc).__name__}") from None
            raise AssertionError("not reached: the second attempt returns or raises")

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def close(self) -> None:
        async with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._conn.close(), 2.0)
                self._drop()


class AlertStore:
    """The claims on ``gatehouse.alert_state``; every method raises :class:`DatabaseUnavailable` when the
    database cannot be reached (the evaluator then decides alone, see :mod:`gatehouse.observe.alerts`)."""

    def __init__(self, link: OwnerLink, lease_s: float) -> None:
        self.link = link
        self.lease_s = lease_s
        self._created = False

    async def _run(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        if not self._created:
            await self.link.run(self._create)
            self._created = True
        return await self.link.run(work)

    @staticmethod
    async def _create(conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", DDL_LOCK_KEY)
            await conn.execute(ALERT_STATE_DDL)

    async def firing(self) -> list[tuple[str, str, dict[str, str]]]:
        """(rule, subject, labels) of every row firing now: what a (re)started instance takes over."""
        rows = await self._run(lambda c: c.fetch(
            "SELECT rule, subject, labels FROM gatehouse.alert_state WHERE state = 'firing'"))
        return [(r["rule"], r["subject"], orjson.loads(r["labels"])) for r in rows]

    async def claim_firing(self, rule: str, subject: str, labels: dict[str, str], value: float | None,
                           summary: str, *, episode: str, started_at: datetime | None = None,
                           delivered: Sequence[str] = (), owed: bool = True) -> Transition | None:
        """The transition to firing if this call made it, else None (already firing: someone else sent it).

        ``owed=False`` records a transition already sent while the database was unreachable (with the
        webhooks that were sent it as ``delivered``, and when it began): no lease is taken, nothing is owed."""
        lease = self.lease_s if owed else None
        row = await self._run(lambda c: c.fetchrow(
            _CLAIM_FIRING, rule, subject, episode, orjson.dumps(labels).decode(), value, summary, started_at,
            list(delivered), lease))
        return None if row is None else _transition(rule, subject, "firing", row, delivered)

    async def claim_resolved(self, rule: str, subject: str, value: float | None, summary: str) -> Transition | None:
        row = await self._run(lambda c: c.fetchrow(_CLAIM_RESOLVED, rule, subject, value, summary, self.lease_s))
        return None if row is None else _transition(rule, subject, "resolved", row)

    async def delivered(self, transition: Transition, webhook: str, everyone: Sequence[str]) -> None:
        """``webhook`` acknowledged ``transition``; the lease ends once all of ``everyone`` did."""
        await self._run(lambda c: c.execute(_DELIVERED, transition.rule, transition.subject, transition.episode,
                                            transition.state, webhook, list(everyone)))

    async def claim_redelivery(self, owed: Callable[[str, Sequence[str]], Sequence[str]]) -> list[Transition]:
        """Rows whose lease ran out with a webhook still missing, claimed for another lease.

        ``owed(rule, delivered)`` says which webhooks still miss the row's notification (none: the rule is gone
        or every webhook has it; the lease is then cleared)."""
        async def work(conn: asyncpg.Connection) -> list[Transition]:
            claimed: list[Transition] = []
            for row in await conn.fetch(_DUE):
                missing = owed(row["rule"], row["delivered"])
                won = await conn.fetchval(_RELEASE_LEASE, row["rule"], row["subject"], row["lease_until"],
                                          not missing, self.lease_s)
                if won is not None and missing:
                    claimed.append(_transition(row["rule"], row["subject"], row["state"], row, row["delivered"]))
            return claimed

        return await self._run(work)

    async def close(self) -> None:
        await self.link.close()

