"""JSON bodies' nesting bound: refused past ``max_json_depth`` levels, whether or not the quick count of opening
brackets lets the walk be skipped."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatehouse.config import ServerConfig
from gatehouse.errors import InvalidBody
from gatehouse.http.body import _depth, parse_payload

SERVER = ServerConfig(max_json_depth=4)
json_values = st.recursive(st.none() | st.integers(-1000, 1000) | st.text(alphabet="ab[{", max_size=3),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner,
                                                                                        max_size=3), max_leaves=12)


def refused(document: object) -> bool:
    try:
        parse_payload(orjson.dumps({"v": document}), "application/json", SERVER)
    except InvalidBody as exc:
        return "nested too deeply" in str(exc)
    return False


def walk_refuses(document: object) -> bool:
    try:
        _depth({"v": document}, SERVER.max_json_depth)
    except InvalidBody:
        return True
    return False


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_the_bound_is_the_walks_whatever_the_quick_count_says(document: object) -> None:
    assert refused(document) == walk_refuses(document)


@pytest.mark.parametrize(("document", "too_deep"), [
    ({"a": 1}, False), ({"a": {"b": 1}}, False), ({"a": {"b": {"c": 1}}}, True), ([[1]], False), ([[[1]]], True),
    ({"a": "[[[[[[{{{{"}, False),  # brackets inside a string open nothing
])
def test_bodies_past_the_depth_are_refused(document: object, too_deep: bool) -> None:
    assert refused(document) is too_deep  # (inside {"v": ...}: the body's own object is the first level)
