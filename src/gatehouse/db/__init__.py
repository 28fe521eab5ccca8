"""Databases: embedded server, connections, pools, catalog, and making the database match the project."""

import contextlib
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from asyncpg.transaction import Transaction


def quote_ident(name: str) -> str:
    """An SQL identifier, quoted; every name gatehouse puts into SQL text goes through here."""
    return '"' + name.replace('"', '""') + '"'


Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"
"""A connection of our own or one borrowed from a pool: the code that uses it cannot tell them apart."""


async def rollback_quietly(transaction: Transaction) -> None:
    """Roll back, unless the connection is already gone (then the server rolled back for us)."""
    with contextlib.suppress(asyncpg.InterfaceError, asyncpg.InternalClientError, OSError):
        await transaction.rollback()
