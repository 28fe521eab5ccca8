"""PostgREST's query grammar, table-driven: query string → tree, or → the error a client sees."""

from __future__ import annotations

import pytest

from gatehouse.errors import ApiError
from gatehouse.query.grammar import parse_read
from gatehouse.query.tree import Filter, OrderTerm, SelectItem

PARSES = [
    ("", {}),
    ("select=*", {"select": None}),
    ("select=id,name", {"select": (SelectItem("id"), SelectItem("name"))}),
    ("select=id%2Cname", {"select": (SelectItem("id"), SelectItem("name"))}),  # as httpx encodes it
    ("select=ident:id", {"select": (SelectItem("id", "ident"),)}),
    ('select="odd,name"', {"select": (SelectItem("odd,name"),)}),
    ("id=eq.5", {"filters": (Filter("id", "eq", "5"),)}),
    ("id=eq.", {"filters": (Filter("id", "eq", ""),)}),
    ("name=eq.a+b", {"filters": (Filter("name", "eq", "a b"),)}),  # + is a space
    ("name=eq.a%2Bb", {"filters": (Filter("name", "eq", "a+b"),)}),
    ("id=neq.1&id=lt.9", {"filters": (Filter("id", "neq", "1"), Filter("id", "lt", "9"))}),
    ("price=not.gte.10", {"filters": (Filter("price", "gte", "10", negated=True),)}),
    ("name=like.*mug*", {"filters": (Filter("name", "like", "%mug%"),)}),
    ("name=ilike.%25mug", {"filters": (Filter("name", "ilike", "%mug"),)}),
    ("id=in.(1,2,3)", {"filters": (Filter("id", "in", ("1", "2", "3")),)}),
    ('name=in.(a+b,"c,d","e\\"f")', {"filters": (Filter("name", "in", ("a b", "c,d", 'e"f')),)}),
    ("id=in.()", {"filters": (Filter("id", "in", ()),)}),
    ("id=not.in.(1)", {"filters": (Filter("id", "in", ("1",), negated=True),)}),
    ("x=is.NULL", {"filters": (Filter("x", "is", "null"),)}),
    ("x=not.is.null", {"filters": (Filter("x", "is", "null", negated=True),)}),
    ("x=is.not_null", {"filters": (Filter("x", "is", "not_null"),)}),
    ("x=is.TRUE", {"filters": (Filter("x", "is", "true"),)}),
    ("order=id", {"order": (OrderTerm("id"),)}),
    ("order=id.desc,name.asc.nullsfirst",
     {"order": (OrderTerm("id", True), OrderTerm("name", False, "first"))}),
    ("order=price.nullslast", {"order": (OrderTerm("price", False, "last"),)}),
    ('order="a.b".desc', {"order": (OrderTerm("a.b", True),)}),
    ("limit=10&offset=20", {"limit": 10, "offset": 20}),
    ("offset=-5", {"offset": 0}),  # PostgREST ignores a negative offset
    ("limit=0", {"limit": 0}),
    ("empty=", {"filters": ()}),  # an empty value is not a filter
]


@pytest.mark.parametrize(("query", "expected"), PARSES)
def test_parses(query: str, expected: dict[str, object]) -> None:
    tree = parse_read(query)
    for field, value in expected.items():
        assert getattr(tree, field) == value, field


ERRORS = [
    ("id=5", 400, "PGRST100"),
    ("id=foo.5", 400, "PGRST100"),
    ("id=eq", 400, "PGRST100"),
    ("x=is.nil", 400, "PGRST100"),
    ("id=in.1,2", 400, "PGRST100"),
    ('id=in.("a)', 400, "PGRST100"),
    ("order=id.sideways", 400, "PGRST100"),
    ("limit=ten", 400, "PGRST100"),
    ("limit=-1", 416, "PGRST103"),
    ("select=na(me", 400, "PGRST100"),
    ("apikey=gh_abc", 400, "GH400"),
    ("or=(id.eq.1,id.eq.2)", 400, "PGRST127"),
    ("orders.limit=1", 400, "PGRST127"),
]


@pytest.mark.parametrize(("query", "status", "code"), ERRORS)
def test_errors(query: str, status: int, code: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_read(query)
    assert (info.value.status, info.value.code) == (status, code)
    body = info.value.body()
    assert set(body) == {"code", "message", "details", "hint"}


def test_too_many_filters_is_bounded() -> None:
    with pytest.raises(ApiError, match="too many filters"):
        parse_read("&".join(f"c{i}=eq.{i}" for i in range(101)))
