"""A composed read (``query/compose.py``), run: its statements on their databases, stitched into one answer.

The pipeline's read (``pipeline.py``) hands a read over here after authentication, admission, the route
(version, contract, format, preferences) and the grant's row filters, so all of those are the same as for
any read. Then:

1. the plan of the query's shape (cached, as single-database reads are), with this request's values;
2. the **key sets** of ``!inner`` embeds, each one statement on its database (at most
   :data:`~gatehouse.query.compose.MAX_INNER_KEYS` keys, else 400), before the statements that test them;
3. the **top statement**: the page, its count, ``count=exact``'s total (``!inner`` included, in SQL);
4. **stitching**, level by level: the markers in the JSON are found by splitting it on this request's nonce
   (128 random bits: no stored text can pass for a marker); each embed's keys, over the whole level, go to
   its database in batches of :data:`~gatehouse.query.compose.MAX_KEYS_PER_BATCH` (at most
   :data:`~gatehouse.query.compose.MAX_KEYS_PER_EMBED` in all, else 400); each marker is replaced by its key's
   JSON text. The JSON PostgreSQL wrote is never parsed into rows: numbers keep their digits, strings their
   escapes, and the answer is byte for byte a single-database read's.

What differs from a single-database read: every statement runs on the **primary** of its database, under the
app's own role and pool there (``runtime.pools.read_row``), because the parts of one answer come from several
databases, and no replica's lag bound or consistency token speaks for all of them; the answer is **never
cached** (the response cache follows the tables of one database); there is no snapshot across databases: each
statement sees its database as it is when it runs. CSV, singular (``vnd.pgrst.object``) and stripped answers
are rendered from the stitched JSON as usual; ``count=planned|estimated`` ask the top database's planner.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import orjson

from gatehouse import suggestions
from gatehouse.access import database_refusal
from gatehouse.db.replicas import PRIMARY_SOURCE
from gatehouse.errors import CompositionTooWide, NotComposable
from gatehouse.http import render
from gatehouse.http.exchange import HttpRequest, HttpResponse
from gatehouse.project import App
from gatehouse.query import compose
from gatehouse.query.compose import ComposedPlan, RemoteEmbed, Statement
from gatehouse.query.grammar import parse_pairs, query_pairs
from gatehouse.query.plans import shape_of
from gatehouse.query.sql import CompiledQuery
from gatehouse.query.tree import Condition
from gatehouse.read_steps import estimated_count, intersect_range
from gatehouse.routes import ReadRoute
from gatehouse.runtime import Runtime

Fetch = Callable[[str, str, Sequence[object]], Awaitable[Any]]
"""``fetch(database, sql, params)``: the statement's one row, under the app's role on that database."""

_Marks = list[tuple[int, int, int, str | None]]
"""The markers of one text: (start, end, embed, key as JSON-escaped in the marker or None)."""


class Run:
    """One request's run of a plan: its nonce, its values, the key sets it read."""

    def __init__(self, plan: ComposedPlan, values: Sequence[str], fetch: Fetch) -> None:
        self.plan, self.values, self.fetch = plan, values, fetch
        self.nonce = secrets.token_hex(16)
        self.prefix = '"\\u0001' + self.nonce
        """A marker's start as PostgreSQL writes it in JSON (a string's U+0001 as ``\\u0001``)."""
        self.keysets: list[list[str]] = [[] for _ in plan.keysets]

    def params(self, statement: Statement, keys: list[str] | None = None) -> list[object]:
        params = list(statement.params)
        for position, index in statement.slots:
            params[position] = self.values[index]
        for position, placeholder in statement.fills:
            if placeholder.kind == "marker":
                params[position] = f"\x01{self.nonce}{placeholder.index}"
            else:
                params[position] = keys if placeholder.kind == "keys" else self.keysets[placeholder.index]
        return params

    async def run(self, statement: Statement, keys: list[str] | None = None) -> Any:
        row = await self.fetch(statement.database, statement.sql, self.params(statement, keys))
        assert row is not None  # an aggregate always returns one row
        return row

    async def read_keysets(self) -> None:
        """Every key set, before the statements that test it (one found later may be tested by an earlier one)."""
        for keyset in reversed(self.plan.keysets):
            assert keyset.statement is not None
            found: list[str] = (await self.run(keyset.statement))[0]
            if len(found) > compose.MAX_INNER_KEYS:
                name = keyset.item.output_name
                raise CompositionTooWide(
                    f"'{name}' matches more than {compose.MAX_INNER_KEYS} rows in another database",
                    details="!inner (or a filter on an embed) across databases reads the keys the embedded side "
                            f"matches first, at most {compose.MAX_INNER_KEYS}",
                    hint=f"Filter '{name}' further, or leave out !inner and filter the answer yourself.")
            self.keysets[keyset.index] = found

    async def stitch(self, texts: list[str]) -> list[str]:
        """The texts with every marker replaced by its embed: each embed's keys, over all the texts, read at once."""
        found = [self._marks(text) for text in texts]
        wanted: dict[int, dict[str, None]] = {}
        for marks in found:
            for _, _, embed, key in marks:
                keys = wanted.setdefault(embed, {})
                if key is not None:  # (None: the parent's key is null; nothing to read)
                    keys[key] = None
        if not wanted:
            return texts
        values = {embed: await self._embed(self.plan.embeds[embed], list(keys)) for embed, keys in wanted.items()}
        stitched = []
        for text, marks in zip(texts, found, strict=True):
            if not marks:
                stitched.append(text)
                continue
            parts, position = [], 0
            for start, end, embed, key in marks:
                parts.append(text[position:start])
                parts.append(self.plan.embeds[embed].empty if key is None else values[embed][key])
                position = end
            parts.append(text[position:])
            stitched.append("".join(parts))
        return stitched

    def _marks(self, text: str) -> _Marks:
        """Where ``text`` holds markers: ``"\\u0001<nonce><embed>[:<key>]"``, the key JSON-escaped."""
        marks: _Marks = []
        prefix, skip = self.prefix, len(self.prefix)
        start = text.find(prefix)
        while start != -1:
            end = text.find('"', start + skip)
            while text[end - 1] == "\\" and (end - len(text[:end].rstrip("\\"))) % 2:  # an escaped quote
                end = text.find('"', end + 1)
            number, colon, key = text[start + skip:end].partition(":")
            marks.append((start, end + 1, int(number), key if colon else None))
            start = text.find(prefix, end + 1)
        return marks

    async def _embed(self, embed: RemoteEmbed, keys: list[str]) -> dict[str, str]:
        """Each key's JSON text for one embed (keys as JSON-escaped in the markers), its own embeds stitched."""
        if not keys:
            return {}
        if len(keys) > compose.MAX_KEYS_PER_EMBED:
            raise CompositionTooWide(
                f"The embed '{embed.item.output_name}' needs {len(keys)} keys from the level above",
                details=f"An embed across databases reads at most {compose.MAX_KEYS_PER_EMBED} keys",
                hint="Ask for fewer rows above it (limit), or fewer embedded rows in between.")
        assert embed.statement is not None
        plain = [orjson.loads(f'"{key}"') if "\\" in key else key for key in keys]
        texts: list[str] = []
        batch = compose.MAX_KEYS_PER_BATCH
        for start in range(0, len(plain), batch):
            row = await self.run(embed.statement, plain[start:start + batch])
            texts.extend(embed.empty if text is None else text for text in row[0])
        return dict(zip(keys, await self.stitch(texts), strict=True))


def _plan(request: HttpRequest, runtime: Runtime, app: App, route: ReadRoute,
          filters: dict[str, tuple[Condition, ...]]) -> tuple[ComposedPlan, Sequence[str]]:
    """The plan of the request's query shape (from the cache, or compiled and kept), and the request's values."""
    estimate = route.count_mode in ("planned", "estimated")
    shape = shape_of(request.query_string) if not estimate else None
    cache = runtime.composed
    key = (route, tuple(filters.items()), shape.key) if shape is not None else None
    plan = cache.get(key) if key is not None else None
    if plan is not None and shape is not None:
        return plan, shape.values

    def compiled(pairs: list[tuple[str, str]], value_count: int | None) -> ComposedPlan:
        query = parse_pairs(pairs)  # 400
        intersect_range(query.top, route.requested)  # 416
        return compose.plan_read(runtime.schemas[route.version], route.readable,
                                 runtime.project.max_rows(app, route.contract.name), filters, route.contract.name,
                                 query, exact_count=route.count_mode == "exact", estimate=estimate,
                                 value_count=value_count,
                                 profile=suggestions.schema_label(runtime.project, app, route.version))  # 400

    if shape is not None:
        plan = compiled(shape.template(), len(shape.values))
        if plan.cacheable:
            cache.put(key, plan)
            return plan, shape.values
    return compiled(query_pairs(request.query_string), None), ()


async def read(request: HttpRequest, runtime: Runtime, app: App, route: ReadRoute,
               filters: dict[str, tuple[Condition, ...]]) -> HttpResponse:
    """The composed answer to a read; the caller has identified the app and chosen the route."""
    pools, project, contract = runtime.pools, runtime.project, route.contract
    assert pools is not None
    if route.replicas is not None and route.replicas.only:  # (an app kept off the primary stays off it)
        raise NotComposable("An embed across databases is read from the primaries, which this application's "
                            f"reads of '{contract.name}' may not use", details="its reads are replica_only",
                            hint="Read each database's contracts with requests of their own.")
    plan, values = _plan(request, runtime, app, route, filters)  # 400 / 416

    async def fetch(database: str, sql: str, params: Sequence[object]) -> Any:
        return await pools.read_row(app.name, database, sql, params)

    run = Run(plan, values, fetch)
    try:
        await run.read_keysets()
        row = await run.run(plan.top)
        total: int | None = row[2] if route.count_mode == "exact" else None
        if plan.estimate is not None:
            exact_up_to = project.max_rows(app, contract.name) if route.count_mode == "estimated" else 0
            rows = CompiledQuery(plan.estimate.sql, run.params(plan.estimate))
            async with pools.connection(app.name, contract.database) as conn:
                total = await estimated_count(conn, rows, exact_up_to=exact_up_to)
        body = (await run.stitch([row[0]]))[0]
    except asyncpg.PostgresError as exc:
        raise database_refusal(exc, project, contract.columns, filters) from None

    request.labels.rows = row[1]
    page = render.Page(body, row[1], plan.offset, total, plan.output_names)
    response = render.read_response(page, route.fmt, dict(route.headers))
    response.headers["Content-Location"] = render.content_location(request.path, request.query_string)
    if runtime.replicas.has(contract.database):  # read from the primaries: as fresh as the data gets
        response.headers.update(PRIMARY_SOURCE)
    return response
