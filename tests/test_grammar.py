"""PostgREST's query grammar, table-driven: query string → tree, or → the error a client sees."""

from __future__ import annotations

import pytest

from gatehouse.errors import ApiError
from gatehouse.query.grammar import parse_query
from gatehouse.query.tree import ColumnItem, EmbedItem, Field, Filter, Logic, OrderTerm, StarItem

ID, NAME = Field("id"), Field("name")


def col(name: str, alias: str | None = None, cast: str | None = None) -> ColumnItem:
    return ColumnItem(Field(name), alias, cast)


SELECTS = [
    ("", (StarItem(),)),
    ("select=*", (StarItem(),)),
    ("select=", (StarItem(),)),
    ("select=id,name", (col("id"), col("name"))),
    ("select=id%2Cname", (col("id"), col("name"))),  # as httpx encodes it
    ("select=ident:id", (col("id", "ident"),)),
    ("select=id::text", (col("id", cast="text"),)),
    ("select=myId:id::text", (col("id", "myId", "text"),)),
    ("select=price::double precision", (col("price", cast="double precision"),)),
    ('select="odd,name"', (col("odd,name"),)),
    ("select= id , name ", (col("id"), col("name"))),
    ("select=data->a->>b", (ColumnItem(Field("data", (("->", "a"), ("->>", "b")))),)),
    ("select=data->0->>-1", (ColumnItem(Field("data", (("->", "0"), ("->>", "-1")))),)),
    ("select=*,users(name)", (StarItem(), EmbedItem("users", items=(col("name"),)))),
    ("select=id,buyer:users!inner(*)", (col("id"), EmbedItem("users", "buyer", None, True, (StarItem(),)))),
    ("select=users!user_id(id)", (EmbedItem("users", None, "user_id", False, (col("id"),)),)),
    ("select=users!fk!inner(id)", (EmbedItem("users", None, "fk", True, (col("id"),)),)),
    ("select=id,items()", (col("id"), EmbedItem("items"))),
    ("select=a(b(c(id)))", (EmbedItem("a", items=(EmbedItem("b", items=(EmbedItem("c", items=(col("id"),)),)),)),)),
]


@pytest.mark.parametrize(("query", "expected"), SELECTS)
def test_select(query: str, expected: tuple[object, ...]) -> None:
    assert parse_query(query).select == expected


FILTERS = [
    ("id=eq.5", Filter(ID, "eq", "5")),
    ("id=eq.", Filter(ID, "eq", "")),
    ("name=eq.a+b", Filter(NAME, "eq", "a b")),  # + is a space
    ("name=eq.a%2Bb", Filter(NAME, "eq", "a+b")),
    ("price=not.gte.10", Filter(Field("price"), "gte", "10", negated=True)),
    ("name=like.*mug*", Filter(NAME, "like", "%mug%")),
    ("name=ilike.%25mug", Filter(NAME, "ilike", "%mug")),
    ("name=match.^R", Filter(NAME, "match", "^R")),
    ("name=imatch.mug$", Filter(NAME, "imatch", "mug$")),
    ("id=in.(1,2,3)", Filter(ID, "in", ("1", "2", "3"))),
    ('name=in.(a+b,"c,d","e\\"f")', Filter(NAME, "in", ("a b", "c,d", 'e"f'))),
    ("id=in.()", Filter(ID, "in", ())),
    ("id=not.in.(1)", Filter(ID, "in", ("1",), negated=True)),
    ("x=is.NULL", Filter(Field("x"), "is", "null")),
    ("x=not.is.null", Filter(Field("x"), "is", "null", negated=True)),
    ("x=is.not_null", Filter(Field("x"), "is", "not_null")),
    ("x=is.TRUE", Filter(Field("x"), "is", "true")),
    ("x=isdistinct.2", Filter(Field("x"), "isdistinct", "2")),
    ("tags=cs.{a,b}", Filter(Field("tags"), "cs", "{a,b}")),
    ("tags=cd.{a,b}", Filter(Field("tags"), "cd", "{a,b}")),
    ("r=ov.[1,5]", Filter(Field("r"), "ov", "[1,5]")),
    ("r=adj.(1,10)", Filter(Field("r"), "adj", "(1,10)")),
    ("r=nxr.(1,10)", Filter(Field("r"), "nxr", "(1,10)")),
    ("t=fts.cat", Filter(Field("t"), "fts", "cat")),
    ("t=plfts(english).fat+cats", Filter(Field("t"), "plfts", "fat cats", language="english")),
    ("t=wfts(simple).a+or+b", Filter(Field("t"), "wfts", "a or b", language="simple")),
    ("name=like(any).{a*,b*}", Filter(NAME, "like", "{a%,b%}", quantifier="any")),
    ("id=gt(all).{1,2}", Filter(ID, "gt", "{1,2}", quantifier="all")),
    ("data->>a=eq.x", Filter(Field("data", (("->>", "a"),)), "eq", "x")),
]


@pytest.mark.parametrize(("query", "expected"), FILTERS)
def test_filter(query: str, expected: Filter) -> None:
    assert parse_query(query).top.where == [expected]


def test_repeated_filters_are_all_kept() -> None:
    assert parse_query("id=gt.1&id=lt.9").top.where == [Filter(ID, "gt", "1"), Filter(ID, "lt", "9")]


LOGIC = [
    ("or=(id.eq.1,id.eq.2)", Logic("or", (Filter(ID, "eq", "1"), Filter(ID, "eq", "2")))),
    ("and=(id.gte.2,name.not.like.*x*)", Logic("and", (Filter(ID, "gte", "2"),
                                                       Filter(NAME, "like", "%x%", negated=True)))),
    ("not.or=(id.eq.1,id.eq.2)", Logic("or", (Filter(ID, "eq", "1"), Filter(ID, "eq", "2")), negated=True)),
    ("or=(id.eq.1,not.and(id.gte.2,id.lte.5))",
     Logic("or", (Filter(ID, "eq", "1"), Logic("and", (Filter(ID, "gte", "2"), Filter(ID, "lte", "5")), True)))),
    ('or=(name.eq."a,b",name.eq.c)', Logic("or", (Filter(NAME, "eq", "a,b"), Filter(NAME, "eq", "c")))),
    ("or=(id.in.(1,2),tags.cs.{a,b})", Logic("or", (Filter(ID, "in", ("1", "2")), Filter(Field("tags"), "cs", "{a,b}")))),
    ("or=(name.eq.entity+2,id.eq.2)", Logic("or", (Filter(NAME, "eq", "entity 2"), Filter(ID, "eq", "2")))),
]


@pytest.mark.parametrize(("query", "expected"), LOGIC)
def test_logic(query: str, expected: Logic) -> None:
    assert parse_query(query).top.where == [expected]


def test_embed_levels() -> None:
    query = parse_query("select=id,items(*)&items.order=qty.desc&items.limit=2&items.offset=1&items.qty=gt.1"
                        "&items.or=(qty.eq.1,qty.eq.2)")
    level = query.levels[("items",)]
    assert level.order == (OrderTerm(Field("qty"), True),)
    assert (level.limit, level.offset) == (2, 1)
    assert level.where[0] == Filter(Field("qty"), "gt", "1")
    assert isinstance(level.where[1], Logic)


ORDERS = [
    ("order=id", (OrderTerm(ID),)),
    ("order=id.desc,name.asc.nullsfirst", (OrderTerm(ID, True), OrderTerm(NAME, False, "first"))),
    ("order=price.nullslast", (OrderTerm(Field("price"), False, "last"),)),
    ('order="a.b".desc', (OrderTerm(Field("a.b"), True),)),
    ("order=data->>age.desc", (OrderTerm(Field("data", (("->>", "age"),)), True),)),
    ("order=users(name).desc", (OrderTerm(NAME, True, None, "users"),)),
]


@pytest.mark.parametrize(("query", "expected"), ORDERS)
def test_order(query: str, expected: tuple[OrderTerm, ...]) -> None:
    assert parse_query(query).top.order == expected


def test_limit_offset_and_write_parameters() -> None:
    query = parse_query('limit=10&offset=5&columns="id","name"&on_conflict=email, "first name"')
    assert (query.top.limit, query.top.offset) == (10, 5)
    assert query.columns == ("id", "name") and query.on_conflict == ("email", "first name")
    assert parse_query("empty=").top.where == []  # an empty value is not a filter


ERRORS = [
    ("id=5", 400, "PGRST100"),
    ("id=foo.5", 400, "PGRST100"),
    ("id=eq", 400, "PGRST100"),
    ("x=is.nil", 400, "PGRST100"),
    ("id=in.1,2", 400, "PGRST100"),
    ('id=in.("a)', 400, "PGRST100"),
    ("id=neq(any).{1}", 400, "PGRST100"),
    ("id=in(any).(1)", 400, "PGRST100"),
    ("order=id.sideways", 400, "PGRST100"),
    ("order=id.asc.nullslasttt", 400, "PGRST100"),
    ("limit=ten", 400, "PGRST100"),
    ("limit=-1", 416, "PGRST103"),  # as PostgREST: "Limit should be greater than or equal to zero."
    ("limit=-1&id=zz", 400, "PGRST100"),  # ... but a syntax error anywhere comes first, as in PostgREST
    ("offset=-1", 400, "PGRST100"),  # PostgREST ignores it
    ("items.limit=-1", 400, "PGRST100"),  # an embed's negative limit is still refused
    ("on_conflict=id)junk", 400, "PGRST100"),  # anything after the column list
    ("on_conflict=id;drop", 400, "PGRST100"),
    ('on_conflict="id"x', 400, "PGRST100"),
    ("on_conflict=id,", 400, "PGRST100"),
    ("columns=id)", 400, "PGRST100"),
    ("name=eq.%FF", 400, "GH400"),  # not UTF-8 once percent-decoded: refused, never replaced
    ("select=%C3", 400, "GH400"),
    ("select=na(me", 400, "PGRST100"),
    ("select=id::text;drop", 400, "PGRST100"),
    ("select=id::\"text\"", 400, "PGRST100"),
    ("select=...users(id)", 400, "PGRST127"),
    ("or=(id.eq.1", 400, "PGRST100"),
    ("or=id.eq.1", 400, "PGRST100"),
    ("columns=", 400, "PGRST100"),
    ("apikey=gh_abc", 400, "GH400"),
]


@pytest.mark.parametrize(("query", "status", "code"), ERRORS)
def test_errors(query: str, status: int, code: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_query(query)
    assert (info.value.status, info.value.code) == (status, code)
    assert set(info.value.body()) == {"code", "message", "details", "hint"}


@pytest.mark.parametrize("query", [
    "&".join(f"c{i}=eq.{i}" for i in range(201)),
    "or=(" + ",".join(f"id.eq.{i}" for i in range(300)) + ")",
    "select=" + "a(" * 20 + "id" + ")" * 20,
    "id=in.(" + ",".join(str(i) for i in range(1001)) + ")",
])
def test_every_list_and_depth_is_bounded(query: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_query(query)
    assert info.value.status == 400
