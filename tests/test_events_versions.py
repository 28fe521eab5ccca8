"""The numbers events carry per aggregate (``aggregate_version``), against real PostgreSQL.

An event's number is its own ``seq``, taken while its writer holds the aggregate's key row, so the events of one
aggregate are numbered in the order their transactions commit, whichever table the change was made in. When the
relay's cleaner deletes events, what the capture still needs of them (the newest version and whether it showed the
row) is kept in ``gatehouse.aggregate_versions``; an outbox of an earlier release (events counted 1, 2, 3) goes on
with numbers above its counts.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from conftest import ProjectFactory, prepare, with_database
from gatehouse import operations
from gatehouse.errors import ProjectError
from gatehouse.events.relay_store import clean, ensure_tables
from test_events_capture import TOML, Outbox, as_deployer, brief, build, owner_dsn

JOINED = TOML.replace("[events.orders]\nversion = 1", "[events.orders]\nversion = 2")
"""orders.v2 shows its customer's name: a change of ``customers`` is an event of each order it joins to."""


async def events_of(conn: asyncpg.Connection, key: str) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT type, aggregate_version, seq, payload->>'customer' AS customer, "
                            "(payload->>'total')::numeric AS total FROM gatehouse.outbox "
                            "WHERE aggregatetype = 'orders' AND aggregateid = $1 ORDER BY aggregate_version", key)
    return [dict(r) for r in rows]


async def test_a_change_through_another_table_waits_for_the_aggregates_writer_and_is_numbered_after_it(
        make_project: ProjectFactory) -> None:
    project = build(make_project, JOINED)
    await prepare(project)
    dsn = await owner_dsn(project)
    first, second = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        await first.execute("INSERT INTO orders (id, customer_id) VALUES (50, 1)")
        tx = first.transaction()
        await tx.start()
        await first.execute("UPDATE orders SET total = 7 WHERE id = 50")  # holds order 50 until it commits
        renaming = asyncio.create_task(second.execute("UPDATE customers SET name = 'ada l.' WHERE id = 1"))
        await asyncio.sleep(0.3)
        assert not renaming.done()  # its trigger waits for order 50's row: the event would otherwise miss total 7
        waiting = await first.fetchval("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1",
                                       second.get_server_pid())
        assert waiting == "Lock"
        await tx.commit()
        await asyncio.wait_for(renaming, 10)
        events = await events_of(first, "50")
        assert [e["type"] for e in events] == ["created", "updated", "updated"]
        assert all(e["aggregate_version"] == e["seq"] for e in events)
        assert (events[-1]["total"], events[-1]["customer"]) == (7, "ada l.")  # the newest shows both changes
        assert (events[-2]["total"], events[-2]["customer"]) == (7, "ada")
    finally:
        await first.close()
        await second.close()


async def test_a_foreign_key_check_does_not_wait_for_the_capture_lock(make_project: ProjectFactory) -> None:
    """The lock the capture takes on a key row is FOR NO KEY UPDATE: a row that only references it (a foreign key
    check takes KEY SHARE) is written while another transaction holds it."""
    project = build(make_project, JOINED)
    await prepare(project)
    dsn = await owner_dsn(project)
    first, second = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        await first.execute("INSERT INTO orders (id, customer_id) VALUES (51, 1)")
        tx = first.transaction()
        await tx.start()
        await first.execute("UPDATE customers SET name = 'ada 2' WHERE id = 1")  # its trigger locks order 51
        assert await first.fetchval("SELECT count(*) FROM gatehouse.outbox WHERE aggregateid = '51'") == 2
        await asyncio.wait_for(second.execute("INSERT INTO lines VALUES (51, 'x', 1)"), 5)  # not kept waiting
        await tx.commit()
    finally:
        await first.close()
        await second.close()


async def test_the_cleaner_keeps_each_aggregates_newest_version_and_presence(make_project: ProjectFactory) -> None:
    project = build(make_project)
    await prepare(project)
    dsn = await owner_dsn(project)
    outbox = Outbox(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("INSERT INTO orders (id, customer_id) VALUES (60, 1), (61, 1), (62, 2)")
        await conn.execute("UPDATE orders SET total = 3 WHERE id = 60")
        await conn.execute("DELETE FROM orders WHERE id = 60")
        await conn.execute("UPDATE orders SET status = 'hidden' WHERE id = 62")  # leaves the contract: deleted
        newest = {r["k"]: r["v"] for r in await conn.fetch(
            "SELECT aggregateid AS k, max(aggregate_version) AS v FROM gatehouse.outbox GROUP BY aggregateid")}
        await outbox.new()

        await ensure_tables(conn)
        assert await clean(conn, [], [], retention_s=0) == 6  # 3 created, 1 updated, 2 deleted
        assert await conn.fetchval("SELECT count(*) FROM gatehouse.outbox") == 0
        kept = {r["aggregateid"]: (r["version"], r["present"]) for r in await conn.fetch(
            "SELECT aggregateid, version, present FROM gatehouse.aggregate_versions WHERE aggregatetype = 'orders'")}
        assert kept == {"60": (newest["60"], False), "61": (newest["61"], True), "62": (newest["62"], False)}

        await conn.execute("UPDATE orders SET status = 'placed' WHERE id = 62")  # shown again: its last was deleted
        await conn.execute("INSERT INTO orders (id, customer_id) VALUES (60, 2)")  # a key used again
        await conn.execute("UPDATE orders SET total = 9 WHERE id = 61")
        events = await outbox.new()
        assert brief(events) == [("orders", "62", "created"), ("orders", "60", "created"), ("orders", "61", "updated")]
        again = {r["aggregateid"]: r["aggregate_version"] for r in await conn.fetch(
            "SELECT aggregateid, aggregate_version FROM gatehouse.outbox")}
        assert all(again[k] > newest[k] for k in ("60", "61", "62"))  # numbers go on above what was deleted
        assert await conn.fetchval("SELECT gatehouse.ev_present('orders', '62')") is True
    finally:
        await conn.close()


async def test_an_outbox_of_counted_versions_goes_on_above_its_counts(make_project: ProjectFactory) -> None:
    """Events of an earlier release counted each aggregate's events (1, 2, 3) in ``aggregate_versions``; the
    numbers taken since are above every count, and presence comes from the newest of both."""
    project = build(make_project)
    await prepare(project)
    dsn = await owner_dsn(project)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("INSERT INTO gatehouse.aggregate_versions VALUES ('orders', '70', 2, false), "
                           "('orders', '71', 1, true)")
        await conn.execute("INSERT INTO gatehouse.outbox (aggregatetype, aggregateid, type, payload, "
                           "contract_version, aggregate_version) VALUES ('orders', '71', 'deleted', '{}', 1, 2)")
        await conn.execute("SELECT setval('gatehouse.outbox_seq_seq', 1)")  # as after TRUNCATE ... RESTART IDENTITY
        await operations.apply_all(project)  # the upgrade's apply: numbers go on above the counts
        assert await conn.fetchval("SELECT gatehouse.ev_present('orders', '70')") is False
        assert await conn.fetchval("SELECT gatehouse.ev_present('orders', '71')") is False  # the outbox's is newer
        assert await conn.fetchval("SELECT gatehouse.ev_present('orders', '72')") is None
        await conn.execute("INSERT INTO orders (id, customer_id) VALUES (70, 1), (71, 1)")
        versions = [r["aggregate_version"] for r in await conn.fetch(
            "SELECT aggregate_version FROM gatehouse.outbox WHERE type = 'created' ORDER BY seq")]
        assert len(versions) == 2 and min(versions) > 2
    finally:
        await conn.close()


async def test_apply_refuses_a_capture_that_could_not_lock_the_key_rows(make_project: ProjectFactory, server_uri: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployer that may place the trigger on the key table (TRIGGER) but not update it could not lock its rows
    from the trigger of another table: apply says which grant to make, and places nothing of that contract."""
    project = build(make_project, JOINED)
    login, database = await as_deployer(project, server_uri, monkeypatch)
    owned = await asyncpg.connect(with_database(server_uri, database))
    try:
        await owned.execute(f'ALTER TABLE orders OWNER TO postgres; GRANT SELECT, INSERT, TRIGGER ON orders TO '
                            f'"{login}"; GRANT ALL ON SEQUENCE orders_id_seq TO "{login}" WITH GRANT OPTION')
        with pytest.raises(ProjectError) as refused:
            await operations.apply_all(project)
        assert "capturing the changes of public.customers locks the rows of public.orders" in str(refused.value)
        assert refused.value.hint == f'GRANT UPDATE ON "public"."orders" TO "{login}", or run `gatehouse apply` as ' \
                                     "the owner of the tables"
        assert await owned.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname = 'gatehouse_event_orders'") == 0
        await owned.execute(f'GRANT UPDATE ON orders TO "{login}"')
        await operations.apply_all(project)
        assert await owned.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname = 'gatehouse_event_orders'") == 2
    finally:
        await owned.close()
