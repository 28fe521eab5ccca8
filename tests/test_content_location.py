"""``Content-Location``: the fast path for plain query strings gives the same header as the general one."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from gatehouse.http.render import _content_location, content_location

general = _content_location.__wrapped__
QUERY_CHARS = string.ascii_letters + string.digits + "-_.~=&%+(),*:é "


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=QUERY_CHARS, max_size=40))
def test_the_fast_path_names_the_resource_as_the_general_one(query: str) -> None:
    assert content_location("/things", query) == general("/things", query)


def test_plain_queries_are_put_in_order_without_escaping() -> None:
    assert content_location("/p", "id=eq.42") == "/p?id=eq.42"
    assert content_location("/p", "price=gte.100&order=id&limit=50") == "/p?limit=50&order=id&price=gte.100"
    assert content_location("/p", "a=1&a=2") == "/p?a=1,2"  # a repeated name: the general path
    assert content_location("/p", "select=id,name") == "/p?select=id%2Cname"
    assert content_location("/p", "") == "/p"


def test_the_general_path_decodes_sorts_groups_and_escapes_each_parameter() -> None:
    assert general("/p", "b=2&%61=x%2Cy&a=3") == "/p?a=x%2Cy,3&b=2"  # one name however spelled, values in order sent
    assert general("/p", "select=id,name&id=eq.7") == "/p?id=eq.7&select=id%2Cname"
    assert general("/p", "select=id,name&id=eq.8") == "/p?id=eq.8&select=id%2Cname"  # a new id, the select as kept
    assert general("/p", "q=a+b&&r=é") == "/p?q=a%20b&r=%C3%A9"
    assert general("/p", "&&") == "/p"
