"""The real ``postgrest`` Python client (supabase postgrest-py), unchanged, against a real ``gatehouse serve``.

The client is built the way its users build it: a base URL and an ``apikey`` header. It then sends what it
always sends (``Accept-Profile: public`` and ``Content-Profile: public`` on every request, ``Prefer:
return=representation`` on writes, quoted ``columns=`` on bulk inserts, a ``{}`` body on DELETE). Every
check compares real values; what the client cannot show (the HTTP status) is read from the responses it got.
Where gatehouse answers differently from PostgREST, the check says what PostgREST answers and is marked
``xfail(strict=True)``, so it turns red the day the server is fixed and the mark must go.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from compat_server import SEED_AUTHORS, SEED_BOOKS, CompatServer, compat_server

postgrest = pytest.importorskip("postgrest", reason="the postgrest client is a test dependency: pip install '.[test]'")

from postgrest import APIError, APIResponse, CountMethod, ReturnMethod, SyncPostgrestClient  # noqa: E402
from postgrest.constants import DEFAULT_POSTGREST_CLIENT_HEADERS  # noqa: E402


class Exchanges:
    """The HTTP exchanges the client made, newest last (the client keeps the status to itself)."""

    def __init__(self) -> None:
        self.seen: list[httpx.Response] = []

    def __call__(self, response: httpx.Response) -> None:
        self.seen.append(response)

    @property
    def last(self) -> httpx.Response:
        return self.seen[-1]


@pytest.fixture(scope="module")
def server(server_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CompatServer]:
    with compat_server(server_uri, tmp_path_factory.mktemp("compat_py") / "project") as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh_rows(server: CompatServer) -> Iterator[None]:
    yield
    server.forget_writes()


@pytest.fixture
def exchanges() -> Exchanges:
    return Exchanges()


def _client(server: CompatServer, exchanges: Exchanges, **headers: str) -> SyncPostgrestClient:
    client = SyncPostgrestClient(server.base_url, headers={**DEFAULT_POSTGREST_CLIENT_HEADERS, **headers})
    client.session.event_hooks = {"response": [exchanges]}
    return client


@pytest.fixture
def client(server: CompatServer, exchanges: Exchanges) -> Iterator[SyncPostgrestClient]:
    pg = _client(server, exchanges, apikey=server.key)
    yield pg
    pg.aclose()


def _rows(response: APIResponse) -> list[dict[str, Any]]:
    """The rows of a response, as dicts (the client types them as any JSON)."""
    assert isinstance(response.data, list) and all(isinstance(row, dict) for row in response.data)
    return [dict(row) for row in response.data]  # type: ignore[arg-type]


def _authors(*ids: int, columns: tuple[str, ...] = ("id", "handle", "name", "born", "country")) -> list[dict[str, Any]]:
    by_id = {row["id"]: row for row in SEED_AUTHORS}
    return [{c: by_id[i][c] for c in columns} for i in ids]


def _books(author_id: int) -> list[dict[str, Any]]:
    return [row for row in SEED_BOOKS if row["author_id"] == author_id]


# ---------------------------------------------------------------------------------------------- reads

Query = Callable[[SyncPostgrestClient], Any]
FILTERS: list[tuple[str, Query, list[int]]] = [
    ("eq", lambda c: c.table("authors").select("id").eq("country", "GB"), [1, 4]),
    ("neq", lambda c: c.table("authors").select("id").neq("country", "GB"), [2, 3]),  # NULL <> 'GB' is not true
    ("gt", lambda c: c.table("authors").select("id").gt("born", 1812), [2, 3]),
    ("gte", lambda c: c.table("authors").select("id").gte("born", 1812), [2, 3, 4]),
    ("lt and lte together", lambda c: c.table("authors").select("id").lt("born", 1900).lte("id", 2), [1, 2]),
    ("in_", lambda c: c.table("authors").select("id").in_("handle", ["calvino", "austen", "no,such"]), [1, 3]),
    ("in_ with spaces", lambda c: c.table("authors").select("id").in_("name", ["Jane Austen", "Italo Calvino"]),
     [1, 3]),
    ("like", lambda c: c.table("authors").select("id").like("name", "%Dick%"), [4]),
    ("like with *", lambda c: c.table("authors").select("id").like("name", "J*"), [1, 2]),
    ("ilike", lambda c: c.table("authors").select("id").ilike("name", "%jane%"), [1]),
    ("is_ None", lambda c: c.table("authors").select("id").is_("born", None), [5]),
    ("is_ 'null'", lambda c: c.table("authors").select("id").is_("country", "null"), [5]),
    ("not_.is_", lambda c: c.table("authors").select("id").not_.is_("born", "null"), [1, 2, 3, 4]),
    ("or_", lambda c: c.table("authors").select("id").or_("country.eq.AR,born.lt.1800"), [1, 2]),
    ("or_ nested and", lambda c: c.table("authors").select("id").or_("id.eq.5,and(born.gt.1800,born.lt.1900)"),
     [2, 4, 5]),
    ("not_.eq", lambda c: c.table("authors").select("id").not_.eq("country", "GB"), [2, 3]),
    ("not_.in_", lambda c: c.table("authors").select("id").not_.in_("id", [1, 2, 3]), [4, 5]),
    ("match", lambda c: c.table("authors").select("id").match({"country": "GB", "born": 1812}), [4]),
    ("filter()", lambda c: c.table("authors").select("id").filter("born", "lt", "1800"), [1]),
    ("another contract", lambda c: c.table("books").select("id").gt("pages", 400), [1, 7]),
]


@pytest.mark.parametrize(("query", "expected"), [(q, e) for _, q, e in FILTERS], ids=[n for n, _, _ in FILTERS])
def test_filters(client: SyncPostgrestClient, query: Query, expected: list[int]) -> None:
    response = query(client).order("id").execute()
    assert [row["id"] for row in _rows(response)] == expected
    assert response.count is None


def test_select_shapes_rows(client: SyncPostgrestClient) -> None:
    every = client.table("authors").select("*").order("id").execute()
    assert every.data == SEED_AUTHORS  # the contract's columns only: internal_note is not in it
    renamed = client.table("authors").select("who:name,handle").eq("id", 2).execute()
    assert renamed.data == [{"who": "Jorge Luis Borges", "handle": "borges"}]


def test_embedding(client: SyncPostgrestClient) -> None:
    calvino = (client.table("authors").select("id,name,books(*)").eq("id", 3)
               .order("id", foreign_table="books").execute())
    assert calvino.data == [{"id": 3, "name": "Italo Calvino", "books": _books(3)}]

    everyone = (client.table("authors").select("id,books(title)").order("id")
                .order("title", desc=True, foreign_table="books").execute())
    assert everyone.data == [
        {"id": 1, "books": [{"title": "Persuasion"}, {"title": "Emma"}]},
        {"id": 2, "books": [{"title": "Ficciones"}]},
        {"id": 3, "books": [{"title": "The Baron in the Trees"}, {"title": "Invisible Cities"},
                            {"title": "If on a winter's night a traveler"}]},
        {"id": 4, "books": [{"title": "Bleak House"}]},
        {"id": 5, "books": []},  # to-many with no rows: an empty array
    ]

    limited = (client.table("authors").select("id,books(id)").eq("id", 3)
               .order("id", foreign_table="books").limit(1, foreign_table="books").execute())
    assert limited.data == [{"id": 3, "books": [{"id": 4}]}]

    to_one = client.table("books").select("title,author:authors(name,country)").in_("id", [1, 3]).order("id").execute()
    assert to_one.data == [{"title": "Emma", "author": {"name": "Jane Austen", "country": "GB"}},
                           {"title": "Ficciones", "author": {"name": "Jorge Luis Borges", "country": "AR"}}]

    inner = (client.table("authors").select("id,books!inner(title)").eq("books.title", "Bleak House")
             .execute())
    assert inner.data == [{"id": 4, "books": [{"title": "Bleak House"}]}]


def test_order_limit_and_range(client: SyncPostgrestClient, exchanges: Exchanges) -> None:
    by_birth = client.table("authors").select("id").order("born", desc=True, nullsfirst=True).execute()
    assert [r["id"] for r in _rows(by_birth)] == [5, 3, 2, 4, 1]
    nulls_last = client.table("authors").select("id").order("born").execute()
    assert [r["id"] for r in _rows(nulls_last)] == [1, 4, 2, 3, 5]
    two_keys = client.table("authors").select("id").order("country", desc=True).order("id", desc=True).execute()
    assert [r["id"] for r in _rows(two_keys)] == [5, 3, 4, 1, 2]  # DESC puts NULLs first, as in PostgreSQL

    first_two = client.table("authors").select("id").order("id").limit(2).execute()
    assert [r["id"] for r in _rows(first_two)] == [1, 2]
    assert exchanges.last.headers["content-range"] == "0-1/*"

    middle = client.table("authors").select("id").order("id").range(1, 3).execute()  # offset=1&limit=3
    assert [r["id"] for r in _rows(middle)] == [2, 3, 4]
    assert exchanges.last.url.params["offset"] == "1" and exchanges.last.url.params["limit"] == "3"
    assert exchanges.last.headers["content-range"] == "1-3/*"

    past_the_end = client.table("authors").select("id").order("id").range(10, 19).execute()
    assert past_the_end.data == []
    assert exchanges.last.status_code == 200 and exchanges.last.headers["content-range"] == "*/*"


def test_single_and_maybe_single(client: SyncPostgrestClient, exchanges: Exchanges) -> None:
    one = client.table("authors").select("*").eq("handle", "borges").single().execute()
    assert one.data == _authors(2)[0]
    assert exchanges.last.headers["content-type"].startswith("application/vnd.pgrst.object+json")

    with pytest.raises(APIError) as none:
        client.table("authors").select("*").eq("id", 99).single().execute()
    assert (none.value.code, none.value.message) == ("PGRST116", "Cannot coerce the result to a single JSON object")
    assert none.value.details == "The result contains 0 rows" and exchanges.last.status_code == 406

    with pytest.raises(APIError) as many:
        client.table("authors").select("id").eq("country", "GB").single().execute()
    assert many.value.code == "PGRST116" and many.value.details == "The result contains 2 rows"

    assert client.table("authors").select("*").eq("id", 99).maybe_single().execute() is None
    found = client.table("authors").select("id,name").eq("id", 1).maybe_single().execute()
    assert found is not None and found.data == {"id": 1, "name": "Jane Austen"}


def test_csv(client: SyncPostgrestClient, exchanges: Exchanges) -> None:
    text = client.table("authors").select("id,name,born").in_("id", [1, 5]).order("id").csv().execute()
    assert text.data == "id,name,born\n1,Jane Austen,1775\n5,Anonymous,"  # NULL is an empty field, no final newline
    assert exchanges.last.headers["content-type"] == "text/csv; charset=utf-8"


def test_strip_nulls(client: SyncPostgrestClient, exchanges: Exchanges) -> None:
    rows = client.table("authors").select("*").in_("id", [1, 5]).order("id").strip_nulls().execute()
    assert rows.data == [_authors(1)[0], {"id": 5, "handle": "anon", "name": "Anonymous"}]
    assert exchanges.last.headers["content-type"] == "application/vnd.pgrst.array+json;nulls=stripped; charset=utf-8"
    one = client.table("authors").select("*").eq("id", 5).strip_nulls().single().execute()
    assert one.data == {"id": 5, "handle": "anon", "name": "Anonymous"}
    assert exchanges.last.headers["content-type"] == "application/vnd.pgrst.object+json;nulls=stripped; charset=utf-8"


def test_text_search(client: SyncPostgrestClient) -> None:
    plain = client.table("authors").select("id").text_search("name", "italo calvino",
                                                               {"type": "plain", "config": "english"}).execute()
    assert plain.data == [{"id": 3}]
    web = client.table("authors").select("id").text_search("name", "jane OR charles", {"type": "web_search"})
    assert web.order("id").execute().data == [{"id": 1}, {"id": 4}]


def test_counts(client: SyncPostgrestClient, exchanges: Exchanges) -> None:
    filtered = client.table("authors").select("id", count=CountMethod.exact).eq("country", "GB").order("id").execute()
    assert filtered.count == 2 and filtered.data == [{"id": 1}, {"id": 4}]
    assert exchanges.last.status_code == 200 and exchanges.last.headers["content-range"] == "0-1/2"

    head = client.table("authors").select("*", count=CountMethod.exact, head=True).execute()
    assert head.count == 5 and head.data == []
    assert exchanges.last.request.method == "HEAD" and exchanges.last.content == b""

    page = client.table("books").select("id", count=CountMethod.exact).order("id").range(0, 1).execute()
    assert page.count == 7 and page.data == [{"id": 1}, {"id": 2}]
    assert exchanges.last.status_code == 206 and exchanges.last.headers["content-range"] == "0-1/7"

    planned = client.table("books").select("id", count=CountMethod.planned).limit(1).execute()
    assert isinstance(planned.count, int) and planned.count >= 1


# --------------------------------------------------------------------------------------------- writes


def test_insert(client: SyncPostgrestClient, server: CompatServer, exchanges: Exchanges) -> None:
    created = client.table("authors").insert({"handle": "w-ins", "name": "Wilma Insert", "born": 1950}).execute()
    assert exchanges.last.status_code == 201 and exchanges.last.headers["content-range"] == "*/*"
    row = _rows(created)[0]
    assert {k: v for k, v in row.items() if k != "id"} == {"handle": "w-ins", "name": "Wilma Insert", "born": 1950,
                                                           "country": "XX"}  # the column default applied
    stored = server.query("SELECT id, name, internal_note FROM authors WHERE handle = 'w-ins'")
    assert stored == [{"id": row["id"], "name": "Wilma Insert", "internal_note": "not in the contract"}]

    quiet = client.table("authors").insert({"handle": "w-min", "name": "Min"}, returning=ReturnMethod.minimal).execute()
    assert quiet.data == [] and exchanges.last.status_code == 201 and exchanges.last.content == b""
    assert server.query("SELECT name FROM authors WHERE handle = 'w-min'") == [{"name": "Min"}]

    shaped = client.table("books").insert({"author_id": row["id"], "title": "w-First"}).select(
        "title,authors(handle)").execute()
    assert shaped.data == [{"title": "w-First", "authors": {"handle": "w-ins"}}]


def test_bulk_insert(client: SyncPostgrestClient, server: CompatServer, exchanges: Exchanges) -> None:
    rows = [{"handle": "w-b1", "name": "Bulk One", "country": "NL"}, {"handle": "w-b2", "name": "Bulk Two"}]
    nulls = client.table("authors").insert(rows, count=CountMethod.exact).execute()
    assert exchanges.last.url.params["columns"] in ('"handle","name","country"', '"name","handle","country"',
                                                    '"country","handle","name"', '"country","name","handle"',
                                                    '"handle","country","name"', '"name","country","handle"')
    assert nulls.count == 2 and exchanges.last.headers["content-range"] == "*/2"
    assert [(r["handle"], r["country"]) for r in _rows(nulls)] == [("w-b1", "NL"), ("w-b2", None)]  # missing → NULL

    uneven: list[dict[str, object]] = [{"handle": "w-b3", "name": "Bulk Three", "born": 2000},
                                       {"handle": "w-b4", "name": "Bulk Four"}]
    defaults = client.table("authors").insert(uneven, default_to_null=False).execute()
    assert [(r["handle"], r["born"], r["country"]) for r in _rows(defaults)] == [("w-b3", 2000, "XX"),
                                                                                ("w-b4", None, "XX")]
    stored = server.query("SELECT handle, country FROM authors WHERE handle LIKE 'w-b%' ORDER BY handle")
    assert stored == [{"handle": "w-b1", "country": "NL"}, {"handle": "w-b2", "country": None},
                      {"handle": "w-b3", "country": "XX"}, {"handle": "w-b4", "country": "XX"}]


def test_upsert(client: SyncPostgrestClient, server: CompatServer, exchanges: Exchanges) -> None:
    first = client.table("authors").insert({"handle": "w-up", "name": "Before", "born": 1900}).execute()
    author_id = _rows(first)[0]["id"]

    merged = client.table("authors").upsert({"handle": "w-up", "name": "After"}, on_conflict="handle").execute()
    assert merged.data == [{"id": author_id, "handle": "w-up", "name": "After", "born": 1900, "country": "XX"}]
    assert exchanges.last.status_code == 200  # every row conflicted: PostgREST answers 200

    mixed = client.table("authors").upsert([{"handle": "w-up", "name": "Again"}, {"handle": "w-up2", "name": "New"}],
                                           on_conflict="handle").execute()
    assert [(r["handle"], r["name"]) for r in _rows(mixed)] == [("w-up", "Again"), ("w-up2", "New")]
    assert exchanges.last.status_code == 201

    ignored = client.table("authors").upsert(
        [{"handle": "w-up", "name": "Ignored"}, {"handle": "w-up3", "name": "Three"}],
        on_conflict="handle", ignore_duplicates=True).execute()
    assert [(r["handle"], r["name"]) for r in _rows(ignored)] == [("w-up3", "Three")]  # only what was inserted

    by_key = client.table("authors").upsert({"id": author_id, "handle": "w-up", "name": "By key"}).execute()
    assert _rows(by_key)[0]["id"] == author_id and _rows(by_key)[0]["name"] == "By key"

    stored = server.query("SELECT handle, name FROM authors WHERE handle LIKE 'w-up%' ORDER BY handle")
    assert stored == [{"handle": "w-up", "name": "By key"}, {"handle": "w-up2", "name": "New"},
                      {"handle": "w-up3", "name": "Three"}]


def test_update(client: SyncPostgrestClient, server: CompatServer, exchanges: Exchanges) -> None:
    client.table("authors").insert([{"handle": "w-u1", "name": "U1"}, {"handle": "w-u2", "name": "U2"}]).execute()
    changed = client.table("authors").update({"country": "FR"}).like("handle", "w-u%").order("handle").execute()
    assert [(r["handle"], r["country"]) for r in _rows(changed)] == [("w-u1", "FR"), ("w-u2", "FR")]
    assert exchanges.last.status_code == 200 and exchanges.last.headers["content-range"] == "0-1/*"

    nothing = client.table("authors").update({"country": "DE"}).eq("handle", "w-nobody").execute()
    assert nothing.data == []

    quiet = client.table("authors").update({"born": 1999}, returning=ReturnMethod.minimal).eq(
        "handle", "w-u1").execute()
    assert quiet.data == [] and exchanges.last.status_code == 204
    stored = server.query("SELECT handle, born, country FROM authors WHERE handle LIKE 'w-u%' ORDER BY handle")
    assert stored == [{"handle": "w-u1", "born": 1999, "country": "FR"},
                      {"handle": "w-u2", "born": None, "country": "FR"}]
    assert server.query("SELECT count(*) AS n FROM authors WHERE country = 'FR'") == [{"n": 2}]  # seeds untouched


def test_update_count(client: SyncPostgrestClient, exchanges: Exchanges) -> None:
    client.table("authors").insert([{"handle": "w-c1", "name": "C1"}, {"handle": "w-c2", "name": "C2"}]).execute()
    counted = client.table("authors").update({"born": 1}, count=CountMethod.exact).like("handle", "w-c%").execute()
    assert len(counted.data) == 2
    assert exchanges.last.headers["content-range"] == "0-1/2"
    assert counted.count == 2


def test_delete(client: SyncPostgrestClient, server: CompatServer, exchanges: Exchanges) -> None:
    client.table("authors").insert([{"handle": f"w-d{i}", "name": f"D{i}"} for i in range(3)]).execute()
    gone = client.table("authors").delete().eq("handle", "w-d0").execute()
    assert [r["handle"] for r in _rows(gone)] == ["w-d0"]
    assert exchanges.last.request.content == b"{}" and exchanges.last.status_code == 200

    counted = client.table("authors").delete(count=CountMethod.exact).like("handle", "w-d%").execute()
    assert counted.count == 2 and sorted(r["handle"] for r in _rows(counted)) == ["w-d1", "w-d2"]
    assert exchanges.last.headers["content-range"] == "*/2"

    none = client.table("authors").delete(returning=ReturnMethod.minimal).eq("handle", "w-d9").execute()
    assert none.data == [] and exchanges.last.status_code == 204
    assert server.query("SELECT handle FROM authors WHERE handle LIKE 'w-d%'") == []
    assert len(server.query("SELECT id FROM authors")) == len(SEED_AUTHORS)


# --------------------------------------------------------------------------------------------- errors


def test_errors_parse_into_api_error(client: SyncPostgrestClient, exchanges: Exchanges) -> None:
    cases: list[tuple[Query, int, str]] = [
        (lambda c: c.table("authors").insert({"handle": "austen", "name": "Twice"}), 409, "23505"),
        (lambda c: c.table("books").insert({"author_id": 999, "title": "w-orphan"}), 409, "23503"),
        (lambda c: c.table("books").insert({"title": "w-no author"}), 400, "23502"),
        (lambda c: c.table("authors").insert({"handle": "w-x", "name": "X", "internal_note": "n"}), 400, "PGRST204"),
        (lambda c: c.table("authors").select("id").eq("born", "not a year"), 400, "22P02"),
        (lambda c: c.table("authors").select("nope"), 400, "42703"),
        (lambda c: c.table("nope").select("*"), 404, "PGRST205"),
        (lambda c: c.table("authors").select("id,nope(*)"), 400, "PGRST200"),
        (lambda c: c.rpc("nope", {}), 404, "PGRST202"),
        (lambda c: c.rpc("nope", {"a": "1"}, get=True), 404, "PGRST202"),
    ]
    for query, status, code in cases:
        with pytest.raises(APIError) as caught:
            query(client).execute()
        response = exchanges.last
        assert (response.status_code, caught.value.code) == (status, code), (response.url, response.text)
        assert isinstance(caught.value.message, str) and caught.value.message
        assert set(response.json()) == {"code", "message", "details", "hint"}
        assert response.headers["content-type"] == "application/json; charset=utf-8"


def test_head_errors_keep_their_code(client: SyncPostgrestClient, exchanges: Exchanges) -> None:
    with pytest.raises(APIError) as unknown:
        client.table("nope").select("*", count=CountMethod.exact, head=True).execute()
    assert exchanges.last.status_code == 404
    assert unknown.value.code == "PGRST205"
    assert exchanges.last.headers["proxy-status"] == "PostgREST; error=PGRST205"
    with pytest.raises(APIError) as bad:
        client.table("authors").select("*", count=CountMethod.exact, head=True).eq("born", "x").execute()
    assert bad.value.code == "22P02"


def test_keys_and_schemas(server: CompatServer, client: SyncPostgrestClient, exchanges: Exchanges) -> None:
    # supabase-py sends the key twice: apikey, and as a Bearer token
    both = _client(server, exchanges, apikey=server.key).auth(server.key)
    assert both.table("authors").select("id").eq("id", 1).execute().data == [{"id": 1}]
    bearer_only = _client(server, exchanges).auth(server.key)
    assert bearer_only.table("authors").select("id").eq("id", 2).execute().data == [{"id": 2}]

    stranger = _client(server, exchanges, apikey="gh_not_a_real_key")
    with pytest.raises(APIError) as refused:
        stranger.table("authors").select("id").execute()
    assert exchanges.last.status_code == 401 and refused.value.code == "PGRST301"
    assert "www-authenticate" in exchanges.last.headers

    pinned = client.schema("v1")
    assert pinned.table("authors").select("id").eq("id", 3).execute().data == [{"id": 3}]
    assert exchanges.last.request.headers["accept-profile"] == "v1"
    with pytest.raises(APIError) as unknown:
        client.schema("v9").table("authors").select("id").execute()
    assert exchanges.last.status_code == 406 and unknown.value.code == "PGRST106"
    assert unknown.value.message == "Invalid schema: v9"
    for pg in (both, bearer_only, stranger):
        pg.aclose()


def test_server_log_is_clean(server: CompatServer) -> None:
    log = server.log()
    assert "Traceback" not in log and server.key not in log
    assert server.process.poll() is None  # still serving
