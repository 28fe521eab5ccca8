"""The cases of tests/test_postgrest_parity.py: PostgREST's expected answers (from its ``test/spec/Feature`` suite,
releases 14-16), ported onto the parity fixture, in our own wording. ``spec`` names the spec file and case."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

JSON = "application/json; charset=utf-8"


@dataclass(frozen=True)
class Case:
    area: str
    spec: str
    method: str
    url: str
    status: int
    body: Any = None
    """The whole JSON body expected (None: not compared)."""
    headers: Mapping[str, str | None] = field(default_factory=dict)
    """Response headers expected with exactly this value; None: must be absent."""
    send: tuple[tuple[str, str], ...] = ()
    payload: Any = None
    raw: bytes | None = None
    who: str = "client"
    """Whose credentials (test_postgrest_parity.CREDENTIALS): an app's key, a user's token, a broken token..."""
    after: tuple[str, Any] | None = None
    """SQL run as the owner after the request, and its expected value."""
    pending: str | None = None
    """Not at parity yet: why (run as a strict xfail)."""


def err(code: str, message: str, details: str | None = None, hint: str | None = None) -> dict[str, Any]:
    return {"code": code, "details": details, "hint": hint, "message": message}


def table_404(name: str, near: str | None = None, schema: str = "public") -> dict[str, Any]:
    return err("PGRST205", f"Could not find the table '{schema}.{name}' in the schema cache",
               hint=None if near is None else f"Perhaps you meant the table '{schema}.{near}'")


def no_relationship(parent: str, child: str, near: str, schema: str = "public") -> dict[str, Any]:
    return err("PGRST200", f"Could not find a relationship between '{parent}' and '{child}' in the schema cache",
               f"Searched for a foreign key relationship between '{parent}' and '{child}' in the schema '{schema}', "
               "but no matches were found.", f"Perhaps you meant '{near}' instead of '{child}'.")


def bearer(value: str) -> tuple[tuple[str, str], ...]:
    return (("Authorization", value),)


def prefer(*values: str) -> tuple[tuple[str, str], ...]:
    return tuple(("Prefer", value) for value in values)


OBJECT = (("Accept", "application/vnd.pgrst.object+json"),)
RANGE_416 = "Requested range not satisfiable"
SINGULAR = "Cannot coerce the result to a single JSON object"
STRICT = "Invalid preferences given with handling=strict"
PUT_KEYS = "Filters must include all and only primary key columns with 'eq' operators"
MAX_AFFECTED = "Query result exceeds max-affected preference constraint"
SCHEMAS_406 = err("PGRST106", "Invalid schema: unknown", hint="Only the following schemas are exposed: public, v1, v2")
TWO_PARTS = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.bm90IGFuIG9iamVjdA"
ALG_NONE = "eyJ0eXAiOiJKV1QiLCJhbGciOiJub25lIn0.e30.yOBhlOIqn56T-4NvyEXCjfi3UmyQZ-BzXtePMO2NgRI"


def invalid_token(message: str) -> dict[str, str | None]:
    return {"www-authenticate": f'Bearer error="invalid_token", error_description="{message}"'}


CASES = [
    # --- names: tables and paths (ErrorSpec, QuerySpec, MultipleSchemaSpec, OptionsSpec) -----------------------
    Case("names", "QuerySpec: a nonexistent table is a 404", "GET", "/faketable", 404, table_404("faketable"),
         {"proxy-status": "PostgREST; error=PGRST205", "content-type": JSON}),
    Case("names", "ErrorSpec: hint when at least 75% similar (projectx)", "GET", "/projectx", 404,
         table_404("projectx", "projects")),
    Case("names", "ErrorSpec: hint when at least 75% similar (projecxx)", "GET", "/projecxx", 404,
         table_404("projecxx", "projects")),
    Case("names", "ErrorSpec: no hint below 75% (projxxxx)", "GET", "/projxxxx", 404, table_404("projxxxx")),
    Case("names", "MultipleSchemaSpec: the table's schema is the one asked for", "GET", "/v1/projectx", 404,
         table_404("projectx", "projects", schema="v1")),
    Case("names", "MultipleSchemaSpec: the schema by Accept-Profile", "GET", "/projectx", 404,
         table_404("projectx", "projects", schema="v1"), send=(("Accept-Profile", "v1"),)),
    Case("names", "ErrorSpec: a hint only among what the app may see", "GET", "/itemz", 404,
         table_404("itemz", "items"), who="outsider"),
    Case("names", "ErrorSpec: no hint towards a table the app may not see", "GET", "/projectx", 404,
         table_404("projectx"), who="outsider"),
    Case("names", "AuthSpec: a table the app may not see is not found (gatehouse: 404, no hint)", "GET", "/projects",
         404, table_404("projects"), who="outsider"),
    Case("names", "QuerySpec: invalid resource path", "GET", "/first/second/third?select=*", 404,
         err("PGRST125", "Invalid path specified in request URL"), {"proxy-status": "PostgREST; error=PGRST125"}),
    Case("names", "OptionsSpec: 404 for an unknown table", "OPTIONS", "/unknown", 404, table_404("unknown")),
    Case("names", "EmbedDisambiguationSpec: PGRST200 names the schema as PGRST205 does", "GET",
         "/clients?select=*,projectz(*)", 400, no_relationship("clients", "projectz", "projects")),
    Case("names", "EmbedDisambiguationSpec: ... and another version's", "GET", "/v1/clients?select=*,projectz(*)", 400,
         no_relationship("clients", "projectz", "projects", schema="v1")),
    Case("names", "EmbedDisambiguationSpec: ... and a write's select", "POST", "/projects?select=id,clientz(*)", 400,
         no_relationship("projects", "clientz", "clients"), send=prefer("return=representation"),
         payload={"id": 30, "name": "x"}, after=("SELECT count(*) FROM projects WHERE id = 30", 0)),
    # --- the query string (QuerySpec, RelatedQueriesSpec) ---------------------------------------------------------
    Case("query", "QuerySpec: fails if an operator is not given", "GET", "/items?id=0", 400,
         err("PGRST100", '"failed to parse filter (0)" (line 1, column 1)',
             'unexpected "0" expecting "not" or operator (eq, gt, ...)')),
    Case("query", "QuerySpec: fails on an unknown order modifier", "GET", "/items?order=id.asc.nullslasttt", 400,
         err("PGRST100", '"failed to parse order (id.asc.nullslasttt)" (line 1, column 17)',
             "unexpected 't' expecting \",\" or end of input")),
    Case("query", "QuerySpec: filter on an embed that is not selected", "GET",
         "/clients?select=*&non_existent_projects.name=like.*NonExistent*", 400,
         err("PGRST108", "'non_existent_projects' is not an embedded resource in this request",
             hint="Verify that 'non_existent_projects' is included in the 'select' query parameter.")),
    Case("query", "QuerySpec: filter on a misspelt alias", "GET",
         "/clients?select=*,amiga_projects:projects(*)&amiga_projectsss.name=ilike.*Amiga*", 400,
         err("PGRST108", "'amiga_projectsss' is not an embedded resource in this request",
             hint="Verify that 'amiga_projectsss' is included in the 'select' query parameter.")),
    Case("query", "QuerySpec: filter on a nested embed that is not selected", "GET",
         "/clients?select=id,projects(id,tasks(id,name))&projects.tasks2.name=like.Design*", 400,
         err("PGRST108", "'tasks2' is not an embedded resource in this request",
             hint="Verify that 'tasks2' is included in the 'select' query parameter.")),
    Case("query", "RelatedQueriesSpec: a related order on a to-many embed", "GET",
         "/clients?select=*,projects(*)&order=projects(id)", 400,
         err("PGRST118", "A related order on 'projects' is not possible",
             "'clients' and 'projects' do not form a many-to-one or one-to-one relationship")),
    Case("query", "QuerySpec: a filter on an embed takes is.null only", "GET",
         "/clients?select=id,projects(id)&projects=eq.3", 400,
         err("PGRST120", "Bad operator on the 'projects' embedded resource",
             "Only is null or not is null filters are allowed on embedded resources")),
    Case("query", "AndOrParamsSpec: an empty logic tree", "GET", "/items?or=()", 400,
         err("PGRST100", '"failed to parse logic tree (())" (line 1, column 4)',
             'unexpected ")" expecting field name (* or [a..z0..9_$]), negation operator (not) or logic operator '
             "(and, or)")),
    Case("query", "QuerySpec: an unknown media type", "GET", "/items", 406,
         err("PGRST107", "None of these media types are available: text/unknowntype"),
         send=(("Accept", "text/unknowntype"),)),
    Case("query", "QuerySpec: selecting a column that does not exist", "GET", "/projects?select=id,banana", 400,
         err("42703", "column projects.banana does not exist")),
    Case("query", "QuerySpec (PostgreSQL's hint): a misspelt column", "GET", "/projects?select=id,nam", 400,
         err("42703", "column projects.nam does not exist",
             hint='Perhaps you meant to reference the column "projects.name".')),
    # --- pages: limit, offset, Range (RangeSpec) -------------------------------------------------------------------
    Case("range", "RangeSpec: offset past the last row, counted", "GET", "/items?offset=100", 416,
         err("PGRST103", RANGE_416, "An offset of 100 was requested, but there are only 15 rows."),
         {"content-range": "*/15"}, prefer("count=exact")),
    Case("range", "RangeSpec: nonzero offset when there are no rows", "GET", "/menagerie?offset=1", 416,
         err("PGRST103", RANGE_416, "An offset of 1 was requested, but there are only 0 rows."),
         {"content-range": "*/0"}, prefer("count=exact")),
    Case("range", "RangeSpec: Range past the last row, counted", "GET", "/items", 416,
         err("PGRST103", RANGE_416, "An offset of 100 was requested, but there are only 15 rows."),
         {"content-range": "*/15"}, (("Range-Unit", "items"), ("Range", "100-199"), *prefer("count=exact"))),
    Case("range", "RangeSpec: lower boundary above the upper one", "GET", "/items", 416,
         err("PGRST103", RANGE_416,
             "The lower boundary must be lower than or equal to the upper boundary in the Range header."),
         send=(("Range", "1-0"),)),
    Case("range", "RangeSpec: limit and offset on the first level", "GET",
         "/items?select=id&order=id.asc&limit=3&offset=2", 200, [{"id": 3}, {"id": 4}, {"id": 5}],
         {"content-range": "2-4/*"}),
    Case("range", "RangeSpec: limit and offset on HEAD", "HEAD", "/items?select=id&order=id.asc&limit=3&offset=2",
         200, None, {"content-range": "2-4/*", "content-type": JSON}),
    Case("range", "RangeSpec: the Range header overrides limit", "GET", "/items?select=id&order=id.asc&limit=3",
         200, [{"id": 1}, {"id": 2}], {"content-range": "0-1/*"}, (("Range", "0-1"),)),
    Case("range", "RangeSpec: a range beyond the rows is truncated", "GET", "/items?select=id&order=id", 200,
         [{"id": i} for i in range(11, 16)], {"content-range": "10-14/*"}, (("Range", "10-100"),)),
    Case("range", "RangeSpec: an empty page of an empty table", "GET", "/menagerie", 200, [],
         {"content-range": "*/*"}, (("Range", "0-1"),)),
    Case("range", "RangeSpec: a count of an empty answer", "GET", "/items?id=eq.0", 200, [],
         {"content-range": "*/0"}, prefer("count=exact")),
    Case("range", "RangeSpec: limit=0 answers an empty array", "GET", "/items?select=id&limit=0", 200, [],
         {"content-range": "*/*"}),
    Case("range", "RangeSpec: a partial page with its count is 206", "GET", "/items?select=id&order=id&limit=2", 206,
         [{"id": 1}, {"id": 2}], {"content-range": "0-1/15"}, prefer("count=exact")),
    Case("range", "RangeSpec: count=none is not a preference", "GET", "/items?id=eq.1&order=id", 200, [{"id": 1}],
         {"content-range": "0-0/*", "preference-applied": None}, prefer("count=none")),
    Case("range", "RangeSpec: a negative limit", "GET", "/items?select=id&limit=-1", 416,
         err("PGRST103", RANGE_416, "Limit should be greater than or equal to zero.")),
    # --- singular objects (SingularSpec) ---------------------------------------------------------------------------
    Case("singular", "SingularSpec: several rows", "GET", "/items?id=lt.3", 406,
         err("PGRST116", SINGULAR, "The result contains 2 rows"), send=OBJECT),
    Case("singular", "SingularSpec: no row", "GET", "/items?id=eq.0", 406,
         err("PGRST116", SINGULAR, "The result contains 0 rows"), send=OBJECT),
    Case("singular", "SingularSpec: one row", "GET", "/items?id=eq.5", 200, {"id": 5},
         {"content-type": "application/vnd.pgrst.object+json; charset=utf-8"}, OBJECT),
    Case("singular", "SingularSpec: a PATCH of several rows keeps nothing", "PATCH", "/projects?id=lt.3", 406,
         err("PGRST116", SINGULAR, "The result contains 2 rows"), send=(*OBJECT, *prefer("return=representation")),
         payload={"name": "changed"}, after=("SELECT count(*) FROM projects WHERE name = 'changed'", 0)),
    Case("singular", "SingularSpec: a POST of several rows keeps nothing", "POST", "/items", 406,
         err("PGRST116", SINGULAR, "The result contains 2 rows"), send=(*OBJECT, *prefer("return=representation")),
         payload=[{"id": 100}, {"id": 101}], after=("SELECT count(*) FROM items WHERE id >= 100", 0)),
    Case("singular", "SingularSpec: the media type without +json", "GET", "/items?id=eq.5", 200, {"id": 5},
         {"content-type": "application/vnd.pgrst.object+json; charset=utf-8"},
         (("Accept", "application/vnd.pgrst.object"),)),
    Case("singular", "SingularSpec: one updated row", "PATCH", "/projects?id=eq.1", 200,
         {"id": 1, "name": "B Street", "client_id": 1}, send=(*OBJECT, *prefer("return=representation")),
         payload={"name": "B Street"}),
    Case("singular", "SingularSpec: zero updated rows", "PATCH", "/items?id=gt.0&id=lt.0", 406,
         err("PGRST116", SINGULAR, "The result contains 0 rows"), send=OBJECT, payload={"id": 1}),
    Case("singular", "SingularSpec: creating zero rows", "POST", "/items", 406,
         err("PGRST116", SINGULAR, "The result contains 0 rows"), {"content-type": JSON}, OBJECT, []),
    Case("singular", "SingularSpec: deleting several rows keeps them", "DELETE", "/items?id=lt.6", 406,
         err("PGRST116", SINGULAR, "The result contains 5 rows"), send=OBJECT,
         after=("SELECT count(*) FROM items", 15)),
    Case("singular", "SingularSpec: a function's scalar result", "POST", "/rpc/sayhello", 200, "Hello, world",
         send=OBJECT, payload={"name": "world"}),
    # --- headers (QuerySpec, OptionsSpec, MultipleSchemaSpec) --------------------------------------------------------
    Case("headers", "QuerySpec: Content-Location with its parameters sorted", "GET", "/no_pk?b=eq.1&a=eq.1", 200, [],
         {"content-location": "/no_pk?a=eq.1&b=eq.1"}),
    Case("headers", "QuerySpec: Content-Location without parameters", "GET", "/simple_pk", 200, None,
         {"content-location": "/simple_pk"}),
    Case("headers", "QuerySpec: Content-Location percent-encodes", "GET", "/items?select=id&id=in.(1,2)", 200,
         [{"id": 1}, {"id": 2}], {"content-location": "/items?id=in.%281%2C2%29&select=id"}),
    Case("headers", "OptionsSpec: a table with a key", "OPTIONS", "/items", 200, None,
         {"allow": "OPTIONS,GET,HEAD,POST,PUT,PATCH,DELETE"}),
    Case("headers", "OptionsSpec: a table without a key", "OPTIONS", "/no_pk", 200, None,
         {"allow": "OPTIONS,GET,HEAD,POST,PATCH,DELETE"}),
    Case("headers", "OptionsSpec: the root", "OPTIONS", "/", 200, None, {"allow": "OPTIONS,GET,HEAD"}),
    Case("headers", "MultipleSchemaSpec: an unknown Accept-Profile", "GET", "/items", 406, SCHEMAS_406,
         send=(("Accept-Profile", "unknown"),)),
    Case("headers", "MultipleSchemaSpec: an unknown Content-Profile", "POST", "/projects", 406, SCHEMAS_406,
         send=(("Content-Profile", "unknown"),), payload={"id": 20, "name": "x"},
         after=("SELECT count(*) FROM projects WHERE id = 20", 0)),
    Case("headers", "MultipleSchemaSpec: the root with an unknown profile", "GET", "/", 406, SCHEMAS_406,
         send=(("Accept-Profile", "unknown"),)),
]
