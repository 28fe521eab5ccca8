"""Request bodies of writes: JSON (an object or an array of objects), CSV, or a form; every size bounded.

The body is read in chunks and refused as soon as it passes ``max_body_bytes`` (413), so an oversized
upload never sits in memory whole. A bulk body is bounded in rows, and JSON in nesting depth.

Every body is UTF-8. A ``Content-Type`` that declares another ``charset`` (``application/json; charset=latin-1``)
is refused with 415 rather than decoded as UTF-8 anyway or converted by guess, and bytes that are not UTF-8
are refused (400), never replaced.
"""

from __future__ import annotations

import csv
import io
from typing import Any
from urllib.parse import parse_qsl

import orjson

from gatehouse.config import ServerConfig
from gatehouse.errors import InvalidBody, TooManyRows, UnsupportedCharset
from gatehouse.query.tree import Payload


def invalid(message: str, details: str | None = None) -> InvalidBody:
    return InvalidBody(message, details=details)


def _depth(value: Any, limit: int) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise invalid("JSON nested too deeply", f"at most {limit} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def _json_rows(raw: bytes, settings: ServerConfig) -> Payload:
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid("Empty or invalid json") from None
    limit = settings.max_json_depth
    if raw.count(b"{") + raw.count(b"[") >= limit:  # else no value can be deeper than the containers opened
        _depth(document, limit)
    if isinstance(document, dict):
        return Payload([document], single=True)
    if isinstance(document, list):
        if all(isinstance(item, dict) for item in document):
            return Payload(list(document), single=False)
        raise invalid("All object keys must match")  # PostgREST's words for an array that is not all objects
    raise invalid("Empty or invalid json")


def _csv_rows(raw: bytes) -> Payload:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("CSV bodies must be UTF-8") from None
    reader = csv.reader(io.StringIO(text))
    lines = list(reader)
    if not lines:
        raise invalid("Empty CSV", "The first line names the columns")
    header, *records = lines
    if any(len(record) != len(header) for record in records):
        raise invalid("All lines must have same number of fields")
    rows = [{k: (None if v == "NULL" else v) for k, v in zip(header, record, strict=True)} for record in records]
    return Payload(rows, single=False)


def _form_rows(raw: bytes) -> Payload:
    try:
        fields = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise invalid("Form bodies must be UTF-8", "Percent-encode the UTF-8 bytes of each character") from None
    return Payload([dict(fields)], single=True)


def _media_type(content_type: str | None) -> str:
    """The media type, lower-cased; 415 when a ``charset`` parameter names anything but UTF-8."""
    media, *parameters = (content_type or "application/json").split(";")
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            raise UnsupportedCharset(f"The body's charset must be UTF-8, not '{charset[:40]}'",
                                     hint="Send the body in UTF-8, with charset=utf-8 or no charset.")
    return media.strip().lower()


def parse_payload(raw: bytes, content_type: str | None, settings: ServerConfig) -> Payload:
    media = _media_type(content_type)
    if media in ("application/json", "application/vnd.pgrst.object+json", "*/*", ""):
        payload = _json_rows(raw, settings)
    elif media == "text/csv":
        payload = _csv_rows(raw)
    elif media == "application/x-www-form-urlencoded":
        payload = _form_rows(raw)
    else:
        raise invalid(f"Content-Type not acceptable: {media}")  # (json, csv or a form: docs/postgrest-differences.md)
    if len(payload.rows) > settings.max_body_rows:
        raise TooManyRows("Too many rows in one request", details=f"At most {settings.max_body_rows} rows per request",
                          hint="Split the rows into several requests.")
    return payload
