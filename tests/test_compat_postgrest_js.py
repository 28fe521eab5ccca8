"""The real postgrest-js client (``@supabase/postgrest-js``, pinned in tests/compat_js/package.json) under node,
unchanged, against a real ``gatehouse serve``.

``tests/compat_js/check.mjs`` makes a fixed sequence of client calls and prints, for each step, what the client
returned (data, error, count, status) and the HTTP exchanges it made. The checks below compare them with what
PostgREST answers. The package is installed into tests/compat_js/node_modules (git-ignored) only when node and
npm are here, and only again when package.json or package-lock.json changed; without node, npm or the
package, every check here is skipped with the reason. Where gatehouse answers differently from PostgREST, the
check says what PostgREST answers and is marked ``xfail(strict=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compat_server import SEED_AUTHORS, SEED_BOOKS, CompatServer, compat_server

JS_DIR = Path(__file__).resolve().parent / "compat_js"
PACKAGE = JS_DIR / "node_modules" / "@supabase" / "postgrest-js" / "package.json"
STAMP = JS_DIR / "node_modules" / ".gatehouse-install-stamp"
MIN_NODE = 20  # the pinned postgrest-js declares engines: node >= 20
INSTALL_TIMEOUT_S = 300
SCRIPT_TIMEOUT_S = 120


def _node_and_npm() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("postgrest-js checks need node and npm on PATH (node >= 20); not found")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    match = re.match(r"v(\d+)\.", version)
    if match is None or int(match.group(1)) < MIN_NODE:
        pytest.skip(f"postgrest-js checks need node >= {MIN_NODE}; found {version or 'an unreadable version'}")
    return node, npm


def _install(npm: str) -> None:
    """npm install into tests/compat_js/node_modules, unless what is there was installed from these same files."""
    lock = JS_DIR / "package-lock.json"
    wanted = hashlib.sha256((JS_DIR / "package.json").read_bytes() + (lock.read_bytes() if lock.exists() else b""))
    if PACKAGE.exists() and STAMP.exists() and STAMP.read_text() == wanted.hexdigest():
        return
    command = [npm, "ci" if lock.exists() else "install", "--no-audit", "--no-fund", "--ignore-scripts",
               "--loglevel=error"]
    try:
        done = subprocess.run(command, cwd=JS_DIR, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.skip(f"`{' '.join(command[1:])}` in tests/compat_js did not finish in {INSTALL_TIMEOUT_S} s")
    if done.returncode != 0 or not PACKAGE.exists():
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        said = [line for line in lines if re.match(r"npm (error|ERR!) (code|[A-Za-z]*Error|404|network)", line)]
        why = " | ".join((said or lines[-3:])[:3])
        pytest.skip(f"could not install @supabase/postgrest-js (`npm {command[1]}` exited {done.returncode}): {why}")
    STAMP.write_text(wanted.hexdigest())


@pytest.fixture(scope="module")
def node() -> str:
    node, npm = _node_and_npm()
    _install(npm)
    return node


@pytest.fixture(scope="module")
def server(node: str, server_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CompatServer]:
    with compat_server(server_uri, tmp_path_factory.mktemp("compat_js") / "project") as running:
        yield running


@pytest.fixture(scope="module")
def steps(node: str, server: CompatServer) -> dict[str, dict[str, Any]]:
    env = {**os.environ, "COMPAT_BASE_URL": server.base_url, "COMPAT_API_KEY": server.key}
    done = subprocess.run([node, "check.mjs"], cwd=JS_DIR, env=env, capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S)
    assert done.returncode == 0, f"check.mjs failed:\n{done.stderr}\n--- server log ---\n{server.log()}"
    results: dict[str, dict[str, Any]] = json.loads(done.stdout)
    return results


def _result(steps: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    result: dict[str, Any] = steps[name]["result"]
    assert "thrown" not in result, result["thrown"]
    return result


def _last(steps: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    exchange: dict[str, Any] = steps[name]["wire"][-1]
    return exchange


def _ids(*ids: int) -> list[dict[str, int]]:
    return [{"id": i} for i in ids]


def _author(i: int) -> dict[str, Any]:
    return next(dict(row) for row in SEED_AUTHORS if row["id"] == i)



# step → (status the client reports, data it returns)
ANSWERS: list[tuple[str, int, object]] = [
    ("eq", 200, _ids(1, 4)),
    ("neq", 200, _ids(2, 3)),
    ("gt", 200, _ids(2, 3)),
    ("gte_lte", 200, _ids(2, 4)),
    ("in", 200, _ids(1, 3)),
    ("like", 200, _ids(4)),
    ("ilike", 200, _ids(1)),
    ("is_null", 200, _ids(5)),
    ("not_is_null", 200, _ids(1, 2, 3, 4)),
    ("or", 200, _ids(1, 2)),
    ("not_in", 200, _ids(4, 5)),
    ("match", 200, _ids(4)),
    ("filter", 200, _ids(1)),
    ("text_search", 200, _ids(3)),
    ("alias", 200, [{"who": "Jorge Luis Borges", "handle": "borges"}]),
    ("embed", 200, [{"id": 3, "name": "Italo Calvino", "books": [b for b in SEED_BOOKS if b["author_id"] == 3]}]),
    ("embed_all", 200, [
        {"id": 1, "books": [{"title": "Persuasion"}, {"title": "Emma"}]},
        {"id": 2, "books": [{"title": "Ficciones"}]},
        {"id": 3, "books": [{"title": "The Baron in the Trees"}, {"title": "Invisible Cities"},
                            {"title": "If on a winter's night a traveler"}]},
        {"id": 4, "books": [{"title": "Bleak House"}]},
        {"id": 5, "books": []},
    ]),
    ("embed_to_one", 200, [{"title": "Emma", "author": {"name": "Jane Austen", "country": "GB"}},
                           {"title": "Ficciones", "author": {"name": "Jorge Luis Borges", "country": "AR"}}]),
    ("embed_inner", 200, [{"id": 4, "books": [{"title": "Bleak House"}]}]),
    ("order_nulls_first", 200, _ids(5, 3, 2, 4, 1)),
    ("order_default", 200, _ids(1, 4, 2, 3, 5)),
    ("limit", 200, _ids(1, 2)),
    ("range", 200, _ids(2, 3, 4)),
    ("range_past_end", 200, []),
    ("single", 200, _author(2)),
    ("maybe_single_none", 200, None),
    ("maybe_single_one", 200, {"id": 1, "name": "Jane Austen"}),
    ("csv", 200, "id,name,born\n1,Jane Austen,1775\n5,Anonymous,"),
    ("count_exact", 200, _ids(1, 4)),
    ("count_head", 200, None),
    ("count_page", 206, _ids(1, 2)),
    ("strip_nulls", 200, [_author(1), {"id": 5, "handle": "anon", "name": "Anonymous"}]),
    ("insert_minimal", 201, None),
    ("insert_embed", 201, [{"title": "w-js-book", "authors": {"handle": "austen"}}]),
    ("bulk_insert", 201, [{"handle": "w-js-b1", "country": "NL"}, {"handle": "w-js-b2", "country": None}]),
    ("bulk_insert_defaults", 201, [{"handle": "w-js-b3", "born": 2000, "country": "XX"},
                                   {"handle": "w-js-b4", "born": None, "country": "XX"}]),
    ("upsert_merge", 200, [{"handle": "w-js-ins", "name": "Js Merged", "born": 1950}]),  # every row conflicted
    ("upsert_mixed", 201, [{"handle": "w-js-ins", "name": "Js Again"}, {"handle": "w-js-up", "name": "Js New"}]),
    ("upsert_ignore", 201, [{"handle": "w-js-up2", "name": "Js Two"}]),
    ("update", 200, [{"handle": f"w-js-b{i}", "country": "FR"} for i in range(1, 5)]),
    ("update_minimal", 204, None),
    ("update_count", 204, None),
    ("delete", 200, [{"handle": "w-js-b1"}]),
    ("delete_count", 204, None),
    ("after_writes", 200, [
        {"handle": "w-js-ins", "name": "Js Again", "born": 1950, "country": "XX"},
        {"handle": "w-js-min", "name": "Js Minimal", "born": None, "country": "XX"},
        {"handle": "w-js-up", "name": "Js New", "born": None, "country": "XX"},
        {"handle": "w-js-up2", "name": "Js Two", "born": None, "country": "XX"},
    ]),
    ("schema_v1", 200, _ids(3)),
    ("schema_v1_write", 201, None),
]


XFAILS: dict[str, pytest.MarkDecorator] = {}


@pytest.mark.parametrize(("step", "status", "data"),
                         [pytest.param(*answer, id=answer[0], marks=XFAILS.get(answer[0], ())) for answer in ANSWERS])
def test_answers(steps: dict[str, dict[str, Any]], step: str, status: int, data: object) -> None:
    result = _result(steps, step)
    assert result["error"] is None, result["error"]
    assert (result["status"], result["data"]) == (status, data)
    if step == "strip_nulls":
        content_type = _last(steps, step)["responseHeaders"]["content-type"]
        assert content_type == "application/vnd.pgrst.array+json;nulls=stripped; charset=utf-8"


ERRORS = [
    # step → (status, code) of PostgREST's error; the client hands back {code, message, details, hint}
    ("single_none", 406, "PGRST116"),
    ("single_many", 406, "PGRST116"),
    ("err_unique", 409, "23505"),
    ("err_fk", 409, "23503"),
    ("err_not_null", 400, "23502"),
    ("err_unknown_column", 400, "PGRST204"),
    ("err_bad_value", 400, "22P02"),
    ("err_unknown_table", 404, "PGRST205"),
    ("err_rpc", 404, "PGRST202"),
    ("err_rpc_get", 404, "PGRST202"),
    ("err_bad_key", 401, "PGRST301"),
    ("schema_unknown", 406, "PGRST106"),
]


@pytest.mark.parametrize(("step", "status", "code"), ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(steps: dict[str, dict[str, Any]], step: str, status: int, code: str) -> None:
    result = _result(steps, step)
    assert result["data"] is None and result["status"] == status
    error = result["error"]
    assert set(error) == {"code", "message", "details", "hint"} and error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    assert _last(steps, step)["responseHeaders"]["content-type"] == "application/json; charset=utf-8"


def test_singular_details(steps: dict[str, dict[str, Any]]) -> None:
    assert _result(steps, "single_none")["error"]["details"] == "The result contains 0 rows"
    assert _result(steps, "single_many")["error"]["details"] == "The result contains 2 rows"
    assert _result(steps, "schema_unknown")["error"]["message"] == "Invalid schema: v9"


def test_counts_and_ranges(steps: dict[str, dict[str, Any]]) -> None:
    assert _result(steps, "count_exact")["count"] == 2
    assert _last(steps, "count_exact")["responseHeaders"]["content-range"] == "0-1/2"
    head = _last(steps, "count_head")
    assert _result(steps, "count_head")["count"] == 5 and head["method"] == "HEAD"
    assert _result(steps, "count_page")["count"] == 7
    assert _last(steps, "count_page")["responseHeaders"]["content-range"] == "0-1/7"
    ranged = _last(steps, "range")
    assert "offset=1&limit=3" in ranged["url"] and ranged["responseHeaders"]["content-range"] == "1-3/*"
    assert _last(steps, "range_past_end")["responseHeaders"]["content-range"] == "*/*"
    assert _result(steps, "bulk_insert")["count"] == 2
    assert _last(steps, "bulk_insert")["responseHeaders"]["content-range"] == "*/2"
    assert _result(steps, "delete_count")["count"] == 3
    assert _last(steps, "delete_count")["responseHeaders"]["content-range"] == "*/3"


def test_update_count(steps: dict[str, dict[str, Any]]) -> None:
    assert _last(steps, "update_count")["responseHeaders"]["content-range"] == "0-3/4"
    assert _result(steps, "update_count")["count"] == 4


def test_what_the_client_sent(steps: dict[str, dict[str, Any]]) -> None:
    """The requests really were postgrest-js's: gatehouse coped with them as they are."""
    # a read with no schema chosen: only the key (no profile header, no Accept: fetch sends */*)
    assert set(_last(steps, "eq")["requestHeaders"]) == {"apikey"}
    pinned = _last(steps, "schema_v1")["requestHeaders"]
    assert pinned["accept-profile"] == "v1" and "content-profile" not in pinned
    written = _last(steps, "schema_v1_write")["requestHeaders"]
    assert written["content-profile"] == "v1" and "accept-profile" not in written
    bulk = _last(steps, "bulk_insert")
    assert "columns=%22handle%22%2C%22name%22%2C%22country%22" in bulk["url"]
    assert {"count=exact", "return=representation"} <= set(bulk["requestHeaders"]["prefer"].split(", "))
    assert "missing=default" in _last(steps, "bulk_insert_defaults")["requestHeaders"]["prefer"]
    assert "prefer" not in _last(steps, "insert_minimal")["requestHeaders"]  # return=minimal by default
    ignore = _last(steps, "upsert_ignore")
    assert "on_conflict=handle" in ignore["url"]
    assert "resolution=ignore-duplicates" in ignore["requestHeaders"]["prefer"]
    assert _last(steps, "single")["requestHeaders"]["accept"] == "application/vnd.pgrst.object+json"
    assert _last(steps, "csv")["requestHeaders"]["accept"] == "text/csv"
    assert _last(steps, "csv")["responseHeaders"]["content-type"] == "text/csv; charset=utf-8"


def test_writes_reached_the_tables(steps: dict[str, dict[str, Any]], server: CompatServer) -> None:
    rows = server.query("SELECT handle, name, born, country, internal_note FROM authors "
                        "WHERE handle LIKE 'w-js-%' ORDER BY handle")
    note = "not in the contract"  # the table's default for the column the contract leaves out
    assert rows == [
        {"handle": "w-js-ins", "name": "Js Again", "born": 1950, "country": "XX", "internal_note": note},
        {"handle": "w-js-min", "name": "Js Minimal", "born": None, "country": "XX", "internal_note": note},
        {"handle": "w-js-up", "name": "Js New", "born": None, "country": "XX", "internal_note": note},
        {"handle": "w-js-up2", "name": "Js Two", "born": None, "country": "XX", "internal_note": note},
        {"handle": "w-js-v1", "name": "V1", "born": None, "country": "XX", "internal_note": note},
    ]
    assert server.query("SELECT title, author_id FROM books WHERE title LIKE 'w-js-%'") == [
        {"title": "w-js-book", "author_id": 1}]
    seeds = server.query("SELECT id, handle, name, born, country FROM authors WHERE handle NOT LIKE 'w-%' ORDER BY id")
    assert seeds == SEED_AUTHORS  # the failed writes changed nothing
    assert "Traceback" not in server.log() and server.key not in server.log()
