"""The life of an API version: deprecated (Deprecation and Sunset headers), then retired (410, views dropped)."""

from __future__ import annotations

import pytest

from conftest import prepare
from gatehouse import operations
from gatehouse.errors import ProjectError
from gatehouse.project import Project, load_project


def _append(project: Project, text: str) -> None:
    path = project.root / "gatehouse.toml"
    path.write_text(path.read_text() + text)


async def test_deprecated_then_retired(shop: Project, serve_project: object) -> None:
    await prepare(shop)
    _append(shop, '\n[versions.v1]\nstatus = "deprecated"\nsunset = 2027-01-31\n')
    deprecated = load_project(shop.root)
    keys = await prepare(deprecated)
    client, _ = await serve_project(deprecated)  # type: ignore[operator]
    old = await client.get("/products?limit=1", headers={"apikey": keys["web"]})  # web is pinned to v1
    assert old.status_code == 200
    assert old.headers["deprecation"] == "true" and old.headers["sunset"] == "Sun, 31 Jan 2027 00:00:00 GMT"
    new = await client.get("/products?limit=1", headers={"apikey": keys["analytics"]})
    assert "deprecation" not in new.headers

    toml = shop.root / "gatehouse.toml"
    toml.write_text(toml.read_text().replace('status = "deprecated"', 'status = "retired"'))
    with pytest.raises(ProjectError, match="pinned to v1, which is retired"):
        load_project(shop.root)
    toml.write_text(toml.read_text().replace("version = 1\n", "version = 2\n"))
    retired = load_project(shop.root)
    report = await operations.apply_all(retired)
    assert "dropped schema api_v1 (no contract is served in it any more)" in report[0].changes
    client, _ = await serve_project(retired)  # type: ignore[operator]
    gone = await client.get("/products", headers={"apikey": keys["web"], "Accept-Profile": "v1"})
    assert gone.status_code == 410 and gone.json()["code"] == "GH410"
    assert (await client.get("/v1/products", headers={"apikey": keys["web"]})).status_code == 410
    assert (await client.get("/products?limit=1", headers={"apikey": keys["web"]})).status_code == 200  # now v2
