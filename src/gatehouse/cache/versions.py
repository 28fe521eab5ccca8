"""What this instance knows of the data versions (:mod:`.tables`), and how it keeps that knowledge fresh.

A cached answer is served only while the version of each table it was read from is the one this instance
knows now. Three sources move that knowledge forward:

* **the poller** reads every tracked table's version every ``[cache] poll_ms`` (one small query per
  database). A write made by anyone else (SQL, a migration, another instance) is noticed by the next poll;
  an answer is never served when the last successful poll *started* more than :attr:`DataVersions.max_age`
  ago (twice the interval plus 50 ms: 250 ms by default), so if the database stops answering polls, the
  cache stops answering too. That is the bound on staleness for writes made elsewhere.
* **every fill**: the versions are read in the same statement (so the same snapshot) as the rows, so a
  fill is a poll of its own tables too.
* **this instance's own writes**: after a write through gatehouse commits, its tables are *dirty* at once:
  nothing cached for them is served, and nothing read before the write may be stored, until a read that
  started after the write (a fill or a poll) has seen the new version. An app always reads its own writes
  on the instance that made them, without a round trip more on the write.

Dirtiness is an epoch per table: a write moves ``epoch``; a poll or fill that *started* at epoch ``e``
proves the versions up to ``e`` (``clean = e``); the table is dirty while ``clean != epoch``. A fill that
started before a write but finished after it proves nothing and stores nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping

import asyncpg

from gatehouse.cache.tables import SCHEMA

log = logging.getLogger(__name__)

TableId = tuple[str, int]
"""(database, relid): relids are per database."""

POLL = f"SELECT relid, sum(v)::int8 AS v FROM {SCHEMA}.data_versions WHERE relid = ANY($1::oid[]) GROUP BY relid"

_KNOWN, _EPOCH, _CLEAN = 0, 1, 2


class DataVersions:
    """Known version, write epoch and proven epoch of every tracked table."""

    def __init__(self, poll_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.poll_s = poll_s
        self.max_age = 2 * poll_s + 0.05
        """An answer is served only if a poll that started at most this long ago succeeded."""
        self._clock = clock
        self._state: dict[TableId, list[int]] = {}
        self._fresh_at: dict[str, float] = {}
        self._pollers: dict[str, asyncio.Task[None]] = {}
        self._failing: set[str] = set()
        self.polls = 0

    def track(self, tables: Iterable[TableId]) -> None:
        """The tables cached contracts read now (after a reload); what is known of the others is forgotten."""
        wanted = set(tables)
        self._state = {table: self._state.get(table) or [0, 0, 1] for table in wanted}
        # a new table starts dirty (clean 1 != epoch 0) until a poll or fill has read its version

    def databases(self) -> set[str]:
        return {database for database, _ in self._state}

    def fresh(self, database: str) -> bool:
        return self._clock() - self._fresh_at.get(database, float("-inf")) <= self.max_age

    def current(self, database: str, tables: tuple[TableId, ...]) -> tuple[int, ...] | None:
        """The versions an entry must have been read at to be served now, or None when none may be served
        (a table dirty after this instance's write, or polls not answering)."""
        state = self._state
        versions = []
        for table in tables:
            known = state.get(table)
            if known is None or known[_EPOCH] != known[_CLEAN]:
                return None
            versions.append(known[_KNOWN])
        if self._clock() - self._fresh_at.get(database, float("-inf")) > self.max_age:
            return None
        return tuple(versions)

    def epochs(self, tables: tuple[TableId, ...]) -> tuple[int, ...]:
        """Taken before a fill's query is sent: :meth:`filled` needs them."""
        state = self._state
        return tuple(state[table][_EPOCH] if table in state else -1 for table in tables)

    def filled(self, tables: tuple[TableId, ...], epochs: tuple[int, ...], versions: tuple[int, ...]) -> bool:
        """A fill read ``versions`` with its rows. Returns whether its answer may be stored: only if no write
        of this instance happened to these tables while it ran."""
        state = self._state
        proven = True
        for table, epoch, version in zip(tables, epochs, versions, strict=True):
            known = state.get(table)
            if known is None or known[_EPOCH] != epoch:
                proven = False
                continue
            if version > known[_KNOWN]:
                known[_KNOWN] = version
            known[_CLEAN] = epoch
        return proven

    def wrote(self, tables: Iterable[TableId]) -> None:
        """This instance committed a write to these tables (or may have: a failed write counts too)."""
        state = self._state
        for table in tables:
            known = state.get(table)
            if known is not None:
                known[_EPOCH] += 1

    def wrote_database(self, database: str | None = None) -> None:
        """A write whose tables are unknown (``/rpc`` runs any SQL): every table of the database is dirty."""
        self.wrote(table for table in self._state if database is None or table[0] == database)

    # --- polling -------------------------------------------------------------------------------------

    def start(self, pools: Mapping[str, asyncpg.Pool]) -> None:
        """Poll each database that has tracked tables (and stop polling the others)."""
        wanted = self.databases()
        for database in list(self._pollers):
            if database not in wanted:
                self._pollers.pop(database).cancel()
        for database in wanted:
            if database not in self._pollers and database in pools:
                self._pollers[database] = asyncio.create_task(self._poll_forever(database, pools[database]),
                                                              name=f"gatehouse data versions {database}")

    async def stop(self) -> None:
        pollers, self._pollers = list(self._pollers.values()), {}
        for task in pollers:
            task.cancel()
        await asyncio.gather(*pollers, return_exceptions=True)

    async def poll(self, database: str, pool: asyncpg.Pool) -> None:
        """Read the versions of this database's tracked tables once."""
        tables = [table for table in self._state if table[0] == database]
        started = self._clock()
        epochs = self.epochs(tuple(tables))
        rows = await pool.fetch(POLL, [relid for _, relid in tables], timeout=max(self.poll_s, 1.0))
        read = {row["relid"]: row["v"] for row in rows}
        self.filled(tuple(tables), epochs, tuple(read.get(relid, 0) for _, relid in tables))
        self._fresh_at[database] = started
        self.polls += 1

    async def _poll_forever(self, database: str, pool: asyncpg.Pool) -> None:
        while True:
            try:
                await self.poll(database, pool)
                if database in self._failing:
                    self._failing.discard(database)
                    log.warning("the data versions of database %s are read again: cached answers are served "
                                "again", database)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is down or slow: nothing is served from the cache meanwhile
                if database not in self._failing:
                    self._failing.add(database)
                    log.warning("cannot read the data versions of database %s (%s): reads of its cached "
                                "contracts go to the database until it answers", database, type(exc).__name__)
            await asyncio.sleep(self.poll_s)
