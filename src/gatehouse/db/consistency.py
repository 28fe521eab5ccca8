"""Read-your-writes tokens: what a write's answer carries and a later read brings back.

A write through a database that has replicas answers with ``Gatehouse-Consistency: <database>:<xid>``, the
id of the transaction that wrote (read inside it with ``pg_current_xact_id_if_assigned()``, so it costs no
round trip). A read that sends the header back is served by a replica only if that replica's snapshot has the
transaction complete (:mod:`gatehouse.db.replicas`), else by the primary. The token is opaque to clients: keep
the last one per database (or just the last one) and send it back as it came; several may be sent, separated
by commas. A WAL position taken inside the writing transaction would not do: the replica replays it before the
commit, while the rows are still invisible.
"""

from __future__ import annotations

import re

from gatehouse.errors import InvalidConsistencyToken

HEADER = "Gatehouse-Consistency"
REQUEST_HEADER = HEADER.lower()
_TOKEN = re.compile(r'^\s*"?([a-z][a-z0-9_]{0,39}):([0-9]{1,20})"?\s*$')
MAX_TOKENS = 16


def token(database: str, xid: int) -> str:
    return f"{database}:{xid}"


def after_write(header: str | None, database: str) -> int | None:
    """The transaction id the caller must see on ``database`` (None when the header names none there); a
    header that is not a list of tokens is a 400, so a client's mistake is not silently a stale read."""
    if not header:
        return None
    parts = header.split(",")
    if len(parts) > MAX_TOKENS:
        raise InvalidConsistencyToken(f"At most {MAX_TOKENS} tokens may be sent in {HEADER}")
    newest: int | None = None
    for part in parts:
        match = _TOKEN.match(part)
        if match is None:
            raise InvalidConsistencyToken(f"{HEADER} is not a token gatehouse gave",
                                          details=f"{HEADER}: {part.strip()[:60]}",
                                          hint="Send back the header of a write's answer as it came, e.g. shop:7421.")
        if match.group(1) == database:
            xid = int(match.group(2))
            newest = xid if newest is None or xid > newest else newest
    return newest
