"""Each replica of a database (``[databases.<db>] replicas``, named r1, r2... in order): reachable, really a
standby of this primary, replaying, and how far behind.

How far behind is said two ways. In bytes: the primary's ``pg_current_wal_lsn()`` (read first) minus the
replica's ``pg_last_wal_replay_lsn()``: zero means it has everything, however idle the primary. In time,
only when it is behind: ``now() - pg_last_xact_replay_timestamp()`` on the replica (the age of the newest data
it shows; the primary's ``pg_stat_replication.replay_lag`` keeps its last figure while replay is stuck, so it
is only the fallback). WAL written just as doctor looks (a transaction, or the primary's own periodic records)
makes a healthy replica look behind for a few milliseconds, so one that is behind is given half a second to
catch up before its lag is reported.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import asyncpg

from gatehouse.db.connection_errors import CONNECT_ERRORS, address_of, connection_failure
from gatehouse.errors import ProjectError
from gatehouse.observe.doctor import Outcome, bytes_text, fail, ok, seconds_text, warn
from gatehouse.observe.doctor_checks import DatabaseProbe, endpoints_of, reach
from gatehouse.secrets import resolve_secret, source_of

SECOND_LOOK_S = 0.5
REPLICA_STATE = """
SELECT pg_is_in_recovery() AS recovery,
       pg_last_wal_replay_lsn()::text AS replay_lsn,
       pg_last_wal_receive_lsn()::text AS receive_lsn,
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS since_replay,
       current_setting('cluster_name') AS cluster_name,
       current_setting('recovery_min_apply_delay') AS apply_delay,
       current_setting('server_version_num')::int AS version
"""
PRIMARY_ROWS = """
SELECT r.pid, r.application_name, r.client_addr::text AS client, r.state, r.sync_state,
       r.replay_lsn::text AS replay_lsn, extract(epoch FROM r.replay_lag)::float8 AS replay_lag, s.slot_name
FROM pg_stat_replication r LEFT JOIN pg_replication_slots s ON s.active_pid = r.pid
"""


def lsn_bytes(lsn: str | None) -> int | None:
    """``16/B374D848`` → its byte position in the WAL."""
    if not lsn:
        return None
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


class ReplicaProbe:
    """One replica of a database; its checks are ``reach`` (step 1) and ``replica`` (step 7)."""

    def __init__(self, primary: DatabaseProbe, index: int, reference: str | None) -> None:
        self.primary = primary
        self.name = f"r{index + 1}"
        self.target = f"{primary.name}/{self.name}"
        self.key = f"[databases.{primary.name}] replicas[{index}]"
        self.source = source_of(reference)
        self.url: str | None = None
        self.problem: ProjectError | None = None
        try:
            self.url = resolve_secret(reference, what=self.key)
        except ProjectError as exc:
            self.problem = exc
        self.conn: asyncpg.Connection | None = None

    @property
    def options(self) -> Any:
        return self.primary.options

    def drop(self) -> None:
        if self.conn is not None:
            self.conn.terminate()
            self.conn = None

    async def reach(self) -> Outcome:
        if self.url is None:
            message = self.problem.args[0] if self.problem else f"{self.key} is empty"
            return fail(str(message), hint=self.problem.hint if self.problem else None)
        outcome, _ = await reach(endpoints_of(self.url), self.source, self.options.timeout_s)
        return outcome

    async def state(self) -> Outcome:
        assert self.url is not None  # (reach, which this check needs, failed otherwise)
        try:
            self.conn = await asyncpg.connect(self.url, timeout=self.options.timeout_s,
                                              server_settings=self.primary.settings())
        except CONNECT_ERRORS as exc:
            failure = connection_failure(exc, database=self.primary.name, dsn=self.url, source=self.source,
                                         timeout_s=self.options.timeout_s)
            return fail(f"cannot log in to {self.name}: {failure.happened}", hint=failure.check)
        try:
            return await self._state(self.conn)
        finally:
            conn, self.conn = self.conn, None
            if conn is not None:
                await conn.close()

    async def _primary_facts(self) -> tuple[int | None, list[asyncpg.Record], Any]:
        conn = self.primary.conn
        if conn is None or self.primary.database_missing:
            return None, [], None
        current = lsn_bytes(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))
        rows = await conn.fetch(PRIMARY_ROWS)
        return current, rows, await _system_id(conn)

    async def _state(self, conn: asyncpg.Connection) -> Outcome:
        primary_lsn, rows, primary_id = await self._primary_facts()
        state = await conn.fetchrow(REPLICA_STATE)
        assert state is not None
        place = f"{self.key} ({self.source})"
        if not state["recovery"]:
            return fail(f"{self.name} is not a replica: it is not in recovery (it was promoted, or the URL names a "
                        "primary)", hint=f"point {place} at a standby of {self.primary.name}, or remove it")
        replica_id = await _system_id(conn)
        if primary_id is not None and replica_id is not None and primary_id != replica_id:
            return fail(f"{self.name} is a standby of another cluster (system identifier {replica_id}, the primary's "
                        f"is {primary_id})", hint=f"point {place} at a standby of {self.primary.name}'s server")
        paused = await conn.fetchval("SELECT pg_get_wal_replay_pause_state()" if state["version"] >= 140000
                                     else "SELECT CASE WHEN pg_is_wal_replay_paused() THEN 'paused' ELSE "
                                          "'not paused' END")
        receiver = await conn.fetchrow("SELECT status, slot_name, conninfo FROM pg_stat_wal_receiver")
        replay = lsn_bytes(state["replay_lsn"])
        behind = max(0, primary_lsn - replay) if primary_lsn is not None and replay is not None else None
        caught_up = ""
        if behind and paused == "not paused":
            waited = await _catch_up(conn, primary_lsn or 0)
            if waited is not None:
                caught_up = f"it was {bytes_text(behind)} behind and caught up within {seconds_text(waited)}"
                behind = 0
        row = _their_row(rows, receiver, state["cluster_name"], len(self.primary.config.replicas))
        lag = _lag(behind, state["since_replay"], row)
        streaming = receiver is not None and receiver["status"] == "streaming"
        data = {"replay_lsn": state["replay_lsn"], "receive_lsn": state["receive_lsn"], "bytes_behind": behind,
                "lag_s": lag, "paused": paused != "not paused", "pause_state": paused, "streaming": streaming,
                "address": str(address_of(self.url or ""))}
        details = [f"replayed up to {state['replay_lsn']}, received up to {state['receive_lsn'] or 'nothing'}",
                   _primary_line(row, rows), *([caught_up] if caught_up else [])]
        behind_text = "unknown bytes" if behind is None else bytes_text(behind)
        lag_text = "" if not lag else f", {seconds_text(lag)} of lag"
        if paused != "not paused":
            state_text = "paused" if paused == "paused" else "being paused"
            return fail(f"replay is {state_text} on {self.name}: {behind_text} behind{lag_text}, and falling "
                        "further behind", details=details, data=data,
                        hint=f"SELECT pg_wal_replay_resume(); on {self.name} (as a superuser), unless it was paused "
                             "on purpose; meanwhile reads that need fresh data go to the primary")
        if state["apply_delay"] not in ("0", "0ms"):
            details.append(f"recovery_min_apply_delay = {state['apply_delay']}: its replay waits that long on purpose")
        if lag is not None and lag > self.options.fail_lag_s:
            return fail(f"{self.name} is {seconds_text(lag)} behind ({behind_text}), over --fail-lag "
                        f"{seconds_text(self.options.fail_lag_s)}", details=details, data=data, hint=LAG_HINT)
        if not streaming:
            return warn(f"{self.name} is in recovery but not streaming from a primary (no WAL receiver is "
                        f"connected): {behind_text} behind{lag_text}", details=details, data=data,
                        hint=f"read {self.name}'s log: its primary_conninfo, the primary's pg_hba.conf (replication "
                             "entries), a dropped replication slot or WAL removed before it was sent")
        if lag is not None and lag > self.options.max_lag_s:
            return warn(f"{self.name} is {seconds_text(lag)} behind ({behind_text}), over --max-lag "
                        f"{seconds_text(self.options.max_lag_s)}", details=details, data=data, hint=LAG_HINT)
        return ok(f"{self.name} is streaming, {behind_text} behind{lag_text or ', no lag'}", details=details,
                  data=data)


LAG_HINT = ("a replica falls behind when it cannot replay as fast as the primary writes (its disk or CPU), when "
            "long queries on it hold replay back (max_standby_streaming_delay), or when the network is slow; "
            "gatehouse sends reads away from it while it is over each app's max_staleness")


async def _catch_up(conn: asyncpg.Connection, primary_lsn: int) -> float | None:
    """Seconds until the replica replayed up to ``primary_lsn``, or None when it did not within
    :data:`SECOND_LOOK_S` (WAL written just as doctor looked, even the primary's own periodic records, reaches a
    healthy replica within milliseconds: that is not lag)."""
    started = time.perf_counter()
    while time.perf_counter() - started < SECOND_LOOK_S:
        await asyncio.sleep(0.02)
        replay = lsn_bytes(await conn.fetchval("SELECT pg_last_wal_replay_lsn()::text"))
        if replay is not None and replay >= primary_lsn:
            return time.perf_counter() - started
    return None


async def _system_id(conn: asyncpg.Connection) -> int | None:
    try:
        value = await conn.fetchval("SELECT system_identifier FROM pg_control_system()")
    except asyncpg.InsufficientPrivilegeError:
        return None
    return int(value) if value is not None else None


def _their_row(rows: list[asyncpg.Record], receiver: asyncpg.Record | None, cluster_name: str,
               replicas: int) -> asyncpg.Record | None:
    """The primary's pg_stat_replication row for this replica: by its slot, its application_name, or (with one
    replica and one row) the only one."""
    if receiver is not None:
        for row in rows:
            if receiver["slot_name"] and row["slot_name"] == receiver["slot_name"]:
                return row
        match = re.search(r"application_name=(\S+)", receiver["conninfo"] or "")
        names = {match.group(1).strip("'")} if match else set()
        names |= {cluster_name} if cluster_name else set()
        for row in rows:
            if row["application_name"] in names and row["application_name"] != "walreceiver":
                return row
    return rows[0] if len(rows) == 1 and replicas == 1 else None


def _lag(behind: int | None, since_replay: float | None, row: asyncpg.Record | None) -> float | None:
    if behind == 0:
        return 0.0
    if since_replay is not None:
        return max(0.0, since_replay)
    return row["replay_lag"] if row is not None else None  # (the primary's figure stays put while replay is stuck)


def _primary_line(row: asyncpg.Record | None, rows: list[asyncpg.Record]) -> str:
    if row is None:
        return (f"the primary's pg_stat_replication shows {len(rows)} standby(s), none of them known to be this one"
                if rows else "the primary's pg_stat_replication shows no standby (or hides them from this user)")
    lag = "" if row["replay_lag"] is None else f", replay lag {seconds_text(row['replay_lag'])}"
    return (f"the primary sees it: state {row['state']}, {row['sync_state']}, replayed up to {row['replay_lsn']}"
            f"{lag}")
