"""The schema cache: each served view's columns and their PostgreSQL types, read once at start.

The types let the compiler bind every filter value as text and cast it to the column's type inside SQL
(``$1::text::integer``), so PostgreSQL parses values exactly as PostgREST has it do, and a malformed value
becomes a clear 400 from the database's own input functions instead of a Python-side guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from gatehouse.db import Connection

CATALOG_QUERY = r"""
SELECT n.nspname AS schema, c.relname AS view, a.attname AS column,
       format_type(a.atttypid, a.atttypmod) AS type
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname ~ '^api_v[0-9]+$' AND c.relkind IN ('v', 'm')
ORDER BY n.nspname, c.relname, a.attnum
"""


@dataclass(frozen=True, slots=True)
class ViewShape:
    schema: str
    name: str
    columns: dict[str, str]
    """column → type, in the view's order."""


async def load_catalog(conn: Connection) -> dict[tuple[str, str], ViewShape]:
    shapes: dict[tuple[str, str], ViewShape] = {}
    for row in await conn.fetch(CATALOG_QUERY):
        key = (row["schema"], row["view"])
        shape = shapes.get(key)
        if shape is None:
            shape = shapes[key] = ViewShape(row["schema"], row["view"], {})
        shape.columns[row["column"]] = row["type"]
    return shapes
