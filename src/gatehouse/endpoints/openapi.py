"""``GET /``: the OpenAPI 3.1 document of the calling application in one API version.

PostgREST answers its root with a Swagger 2.0 document of everything the database role may see. Here the
document is per caller: it lists only the contracts the app was granted in the version it asked for, so
that — like the 404 for an ungranted contract — nothing else is seen to exist. It is built from the project
and the schema cache alone, with no database work, after the same authentication as every other request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from gatehouse.access import choose_version
from gatehouse.contracts.model import ContractVersion
from gatehouse.contracts.versions import schema_name
from gatehouse.db.catalog import ViewShape
from gatehouse.http.exchange import HttpRequest, HttpResponse
from gatehouse.http.negotiate import CONTENT_TYPES, response_format
from gatehouse.logic.registry import LogicFunction
from gatehouse.pipeline import identify
from gatehouse.project import App, Project
from gatehouse.runtime import Runtime
from gatehouse.sagas.declare import SagaDefinition

OPENAPI_JSON = CONTENT_TYPES["openapi"]
FILTER_HELP = "PostgREST filter, e.g. eq.5, in.(1,2), is.null"
# Query keys that are never filters: a column with one of these names cannot be filtered by its name.
RESERVED_KEYS = frozenset({"select", "order", "limit", "offset", "columns", "on_conflict", "and", "or"})
Schema = dict[str, Any]

# --- PostgreSQL types → JSON Schema -----------------------------------------------------------------
# Values arrive as PostgreSQL's to_json renders them: numeric and bigint as numbers, everything without a
# JSON counterpart (money, interval, bytea, ranges, ...) as a string.

_SIMPLE: dict[str, Schema] = {
    "smallint": {"type": "integer", "format": "int16"},
    "integer": {"type": "integer", "format": "int32"},
    "bigint": {"type": "integer", "format": "int64"},
    "numeric": {"type": "number"},
    "real": {"type": "number", "format": "float"},
    "double precision": {"type": "number", "format": "double"},
    "boolean": {"type": "boolean"},
    "timestamp with time zone": {"type": "string", "format": "date-time"},
    # No offset in the text ("2015-12-08T04:22:57"), so not an RFC 3339 date-time: clients that parse
    # format: date-time strictly would reject it.
    "timestamp without time zone": {"type": "string", "description": "ISO 8601 date and time, no offset"},
    "date": {"type": "string", "format": "date"},
    "uuid": {"type": "string", "format": "uuid"},
    "json": {},
    "jsonb": {},
}
_TYPMOD = re.compile(r"^(?P<base>[a-z ]+?)\s*\((?P<args>[0-9, ]+)\)(?P<rest>.*)$")
_STRINGS_WITH_LENGTH = {"character varying", "character", "bit", "bit varying"}


def _without_null(pg_type: str) -> Schema:
    """The schema of a non-null value of ``pg_type``, as ``format_type()`` writes it."""
    if pg_type.endswith("[]"):  # format_type writes every array, of any dimension, with one []
        return {"type": "array", "items": nullable(_without_null(pg_type[:-2]))}
    match = _TYPMOD.match(pg_type)
    # "numeric(10,2)" → numeric, "timestamp(3) with time zone" → timestamp with time zone
    base = f"{match['base']}{match['rest']}" if match else pg_type
    if match and match["base"] in _STRINGS_WITH_LENGTH:
        return {"type": "string", "maxLength": int(match["args"])}
    return dict(_SIMPLE.get(base, {"type": "string"}))


def nullable(schema: Schema) -> Schema:
    """A view's columns can all be null as far as PostgreSQL knows (views keep no NOT NULL)."""
    kind = schema.get("type")
    if kind is None:  # any JSON value, null included
        return schema
    return {**schema, "type": [kind, "null"]}


def column_schema(pg_type: str) -> Schema:
    return nullable(_without_null(pg_type.strip().lower()))


def contract_schema(contract: ContractVersion, shape: ViewShape | None) -> Schema:
    # The catalog always has the view once the runtime started; without it, the names are still known.
    columns = shape.columns if shape is not None else dict.fromkeys(contract.columns, "")
    properties = {name: column_schema(pg_type) if pg_type else {} for name, pg_type in columns.items()}
    schema: Schema = {"type": "object", "properties": properties}
    if contract.description:
        schema["description"] = contract.description
    return schema


# --- Reusable pieces ---------------------------------------------------------------------------------


def _parameters(version: int) -> dict[str, Schema]:
    # No `example` values: Swagger UI would send them with every "Try it out", and a select or order that
    # names a column is wrong for every contract but one.
    def param(name: str, where: str, schema: Schema, description: str) -> Schema:
        return {"name": name, "in": where, "required": False, "schema": schema, "description": description}

    profile = f"v{version}"
    return {
        "select": param("select", "query", {"type": "string"},
                        "Columns to return, comma-separated, e.g. `id,name`; `alias:column` renames one, "
                        "`other(*)` embeds a related contract."),
        "order": param("order", "query", {"type": "string"},
                       "Sort order, e.g. `price.desc,id`: column[.asc|.desc][.nullsfirst|.nullslast], ..."),
        "limit": param("limit", "query", {"type": "integer", "minimum": 0}, "At most this many rows."),
        "offset": param("offset", "query", {"type": "integer", "minimum": 0}, "Skip this many rows."),
        "range": param("Range", "header", {"type": "string"}, "Rows first-last, counted from 0, e.g. `0-24`."),
        "rangeUnit": param("Range-Unit", "header", {"type": "string"}, "The unit of Range: `items`."),
        "prefer": param("Prefer", "header", {"type": "string"},
                        "PostgREST preferences, e.g. `count=exact` (or planned, estimated), `handling=strict`."),
        "acceptProfile": param(
            "Accept-Profile", "header", {"type": "string", "enum": [profile], "default": profile},
            f"The API version to read; this document describes {profile}. Without it (or the /{profile} "
            "path prefix), the app's default version is served.",
        ),
        "contentProfile": param(
            "Content-Profile", "header", {"type": "string", "enum": [profile], "default": profile},
            f"The API version to write, as PostgREST has it; this document describes {profile}.",
        ),
    }


def _error_responses() -> dict[str, Schema]:
    def error(description: str) -> Schema:
        return {"description": description,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}

    return {
        "BadRequest": error("The query string is malformed, or names a column or value the contract lacks."),
        "Unauthorized": error("No API key, or one that is unknown, revoked or expired."),
        "NotFound": error("No such contract for this application in this API version (or, as in PostgREST, "
                          "SQLSTATE 42883: an operator that does not exist for the column's type)."),
        "NotAcceptable": error("The API version is not served, no media type in Accept is available, or one "
                               "object was asked for (application/vnd.pgrst.object+json) and not one row matched."),
        "RangeNotSatisfiable": error("limit, offset or the Range header cannot be satisfied."),
        "TooManyRequests": error("Too many failed authentication attempts from this address; see Retry-After."),
    }


ERROR_SCHEMA: Schema = {
    "type": "object",
    "description": "PostgREST's error shape; `code` is a PostgREST code (PGRST...), a SQLSTATE or a GH code.",
    "required": ["code", "message", "details", "hint"],
    "properties": {
        "code": {"type": "string"},
        "message": {"type": "string"},
        "details": {"type": ["string", "null"]},
        "hint": {"type": ["string", "null"]},
    },
}

# --- Operations --------------------------------------------------------------------------------------

_READ_PARAMS = ("select", "order", "limit", "offset", "range", "rangeUnit", "prefer", "acceptProfile")
_ERRORS = {"400": "BadRequest", "401": "Unauthorized", "404": "NotFound", "406": "NotAcceptable",
           "429": "TooManyRequests"}


def _ref(kind: str, name: str) -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def _operation(name: str, verb: str, summary: str, parameters: list[Schema], responses: dict[str, Schema],
               body: Schema | None = None) -> Schema:
    """One operation; the error responses every operation shares come first, its own may replace them."""
    shared = {status: _ref("responses", ref) for status, ref in _ERRORS.items()}
    operation: Schema = {"operationId": f"{verb}_{name}", "tags": [name], "summary": summary,
                         "parameters": parameters, "responses": {**shared, **responses}}
    if body is not None:
        operation["requestBody"] = body
    return operation


def _path_item(name: str, columns: list[str], actions: frozenset[str]) -> Schema:
    rows: Schema = {"type": "array", "items": _ref("schemas", name)}
    json_rows = {"application/json": {"schema": rows}}
    read_formats = {**json_rows, "application/vnd.pgrst.object+json": {"schema": _ref("schemas", name)},
                    "text/csv": {"schema": {"type": "string"}}}
    range_header = {"Content-Range": {"description": "Rows sent: first-last/total (total is * if not counted).",
                                      "schema": {"type": "string"}}}
    filters = [{"name": column, "in": "query", "required": False, "schema": {"type": "string"},
                "description": FILTER_HELP} for column in columns if column not in RESERVED_KEYS]
    read_params = [_ref("parameters", p) for p in _READ_PARAMS] + filters
    write_params = [_ref("parameters", "contentProfile"), _ref("parameters", "prefer")]
    changed: dict[str, Schema] = {
        "200": {"description": "The rows changed (with Prefer: return=representation).", "content": json_rows},
        "204": {"description": "Done; no body."},
    }
    one_or_many: Schema = {"oneOf": [_ref("schemas", name), rows]}
    item: Schema = {}
    if "read" in actions:
        item["get"] = _operation(name, "read", f"Read {name}", read_params, {
            "200": {"description": "The rows: the contract's columns, or what `select` asks for (renamed, cast, "
                           "embedded).", "headers": range_header, "content": read_formats},
            "206": {"description": "Part of the rows (with a count).", "headers": range_header,
                    "content": read_formats},
            "416": _ref("responses", "RangeNotSatisfiable"),
        })
        # HEAD answers carry the headers of GET and never a body, errors included.
        bodiless = {status: {"description": "As GET, without a body."} for status in (*_ERRORS, "416")}
        item["head"] = _operation(name, "head", f"Headers of reading {name}", read_params, {
            "200": {"description": "As GET, without a body.", "headers": range_header},
            "206": {"description": "As GET, without a body.", "headers": range_header},
            **bodiless,
        })
    if "insert" in actions:
        item["post"] = _operation(name, "insert", f"Insert into {name}", write_params, {
            "201": {"description": "Created (the rows in the body with Prefer: return=representation).",
                    "content": json_rows},
        }, {"required": True, "content": {"application/json": {"schema": one_or_many}}})
    if "update" in actions:
        item["patch"] = _operation(name, "update", f"Update {name}", [*write_params, *filters], changed, {
            "required": True, "content": {"application/json": {"schema": _ref("schemas", name)}}})
    if "delete" in actions:
        item["delete"] = _operation(name, "delete", f"Delete from {name}", [*write_params, *filters], changed)
    return item


def _function_item(function: LogicFunction) -> Schema:
    """``/rpc/<name>``: arguments and result from the function's own types (pydantic's JSON Schema)."""
    arguments = function.parameters.model_json_schema()
    result = function.result.json_schema()
    responses = {"200": {"description": "The function's result.",
                         "content": {"application/json": {"schema": result}}},
                 "204": {"description": "The function returned nothing."}}
    errors = {status: _ref("responses", name) for status, name in _ERRORS.items() if status != "406"}
    item: Schema = {"post": {
        "tags": ["functions"], "operationId": f"rpc_{function.name}", "summary": function.description or function.name,
        "requestBody": {"required": True, "content": {"application/json": {"schema": arguments}}},
        "responses": {**responses, **errors},
    }}
    if function.read_only:
        item["get"] = {
            "tags": ["functions"], "operationId": f"rpc_{function.name}_get",
            "summary": function.description or function.name,
            "parameters": [{"name": name, "in": "query", "required": name in arguments.get("required", []),
                            "schema": spec} for name, spec in arguments.get("properties", {}).items()],
            "responses": {**responses, **errors},
        }
    return item


def _run_schema(result: Schema) -> Schema:
    """A saga run as ``/sagas`` answers it (endpoints/sagas.py)."""
    return {"type": "object", "required": ["id", "name", "state", "steps_done", "steps_undone", "created_at",
                                           "updated_at"], "properties": {
        "id": {"type": "string", "format": "uuid"},
        "name": {"type": "string"},
        "state": {"type": "string", "enum": ["running", "compensating", "completed", "compensated", "failed"]},
        "steps_done": {"type": "integer"},
        "steps_undone": {"type": "integer"},
        "result": {**result, "description": "Once completed: the saga's result."},
        "error": {"type": ["string", "null"], "description": "Once compensating, compensated or failed: why."},
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
    }}


def _saga_items(saga: SagaDefinition[Any, Any]) -> tuple[dict[str, Schema], dict[str, Schema]]:
    """``/sagas/<name>`` and ``/sagas/<name>/{id}``, and the schemas of the models their input and result use
    (as components named ``saga.<name>.<Model>``, so that ``$ref`` resolves from the document's root)."""
    prefix = f"saga.{saga.name}."
    template = f"#/components/schemas/{prefix}{{model}}"
    given, result = saga.input.json_schema(ref_template=template), saga.result.json_schema(ref_template=template)
    models = {prefix + k: v for schema in (given, result) for k, v in schema.pop("$defs", {}).items()}
    tags, run = ["sagas"], _run_schema(result)
    shared = {status: _ref("responses", ref) for status, ref in _ERRORS.items() if status != "406"}
    answers = {
        "200": {"description": "The run, finished (with Prefer: wait, or a repeated Idempotency-Key).",
                "content": {"application/json": {"schema": run}}},
        "202": {"description": "The run, still going: poll its Location.", "content": {"application/json": {
            "schema": run}}, "headers": {"Location": {"schema": {"type": "string"}}}},
    }
    refused = {"description": "This Idempotency-Key was used for a different request (GH423).",
               "content": {"application/json": {"schema": _ref("schemas", "Error")}}}
    start: Schema = {"post": {
        "tags": tags, "operationId": f"saga_{saga.name}", "summary": f"Start the saga {saga.name}",
        "parameters": [
            {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string", "maxLength": 255},
             "description": "The same key and input answer the same run; another input under it is 422."},
            {"name": "Prefer", "in": "header", "schema": {"type": "string"},
             "description": "wait=<seconds>: answer 200 with the result if the run finishes by then."}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": given}}},
        "responses": {**shared, **answers, "422": refused},
    }}
    follow: Schema = {"get": {
        "tags": tags, "operationId": f"saga_{saga.name}_run", "summary": f"A run of the saga {saga.name}",
        "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}],
        "responses": {**shared, **answers},
    }}
    return {f"/sagas/{saga.name}": start, f"/sagas/{saga.name}/{{id}}": follow}, models


EVENTS_ONLY = frozenset({"events"})


def build_openapi(project: Project, app: App, version: int, catalog: Mapping[tuple[str, str], ViewShape],
                  server_url: str) -> dict[str, Any]:
    """The document for ``app`` in API ``version``: only its granted contracts, sorted by name."""
    served = project.versions.served.get(version, {})
    visible = [(served[name], actions) for name in sorted(served)
               if (actions := app.grant_for(name) - EVENTS_ONLY)]  # (a feed's grant is not a path of the API)
    schemas: dict[str, Schema] = {}
    paths: dict[str, Schema] = {}
    tags: list[Schema] = []
    for contract, actions in visible:
        schema = contract_schema(contract, catalog.get((schema_name(version), contract.name)))
        schemas[contract.name] = schema
        paths[f"/{contract.name}"] = _path_item(contract.name, list(schema["properties"]), actions)
        tags.append({"name": contract.name, "description": contract.description} if contract.description
                    else {"name": contract.name})
    for name in sorted(app.config.functions):
        paths[f"/rpc/{name}"] = _function_item(project.functions[name])
    if app.config.functions:
        tags.append({"name": "functions", "description": "Business logic (logic/*.py) this application may call."})
    for name in sorted(app.config.sagas):
        saga_paths, models = _saga_items(project.sagas.sagas[name])
        paths.update(saga_paths)
        schemas.update(models)
    if app.config.sagas:
        tags.append({"name": "sagas", "description": "Workflows (logic/*.py) this application may start."})
    description = (f"The contracts that the application **{app.name}** may use in API v{version}. "
                   "Authenticate with the application's key in the `apikey` header "
                   "(or as `Authorization: Bearer <key>`).")
    if app.config.description:
        description += f"\n\n{app.name}: {app.config.description}"
    return {
        "openapi": "3.1.0",
        "info": {"title": f"{project.name} API v{version}", "version": f"v{version}", "description": description},
        "servers": [{"url": server_url}],
        "security": [{"apiKey": []}, {"bearer": []}],
        "tags": tags,
        "paths": paths,
        "components": {
            "schemas": {**schemas, "Error": ERROR_SCHEMA},
            "parameters": _parameters(version),
            "responses": _error_responses(),
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "apikey",
                           "description": "The application's API key (gh_<id>_<secret>)."},
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "The same API key, sent as Authorization: Bearer <key>."},
            },
        },
    }


async def openapi_endpoint(request: HttpRequest, runtime: Runtime) -> HttpResponse:
    """``GET /`` and ``HEAD /``: 401 before anything, 406 for a version that is not served. ``OPTIONS /``: the
    methods the root takes, as PostgREST answers it."""
    project = runtime.project
    _, app = await identify(request, runtime)  # 401
    if request.method == "OPTIONS":
        return HttpResponse(200, {"Allow": "OPTIONS,GET,HEAD"})
    version = choose_version(project, app, request.headers.get("accept-profile"), None)  # 406
    request.labels.api_version = version
    response_format(request.headers.get("accept"), allowed=("openapi", "json"))  # 406 for e.g. text/csv
    server_url = request.base_url.rstrip("/")
    document = build_openapi(project, app, version, runtime.catalog, server_url)
    headers = {"Content-Profile": f"v{version}", "Vary": "apikey, Authorization, Accept-Profile",
               "Cache-Control": "private, no-cache"}
    return HttpResponse(200, headers, orjson.dumps(document), OPENAPI_JSON)  # for HEAD the server sends no body
