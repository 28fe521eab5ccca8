"""The life of an API version: deprecated (Deprecation and Sunset headers), then retired (410, views dropped);
`gatehouse versions` says who still calls each one, in a window."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from conftest import prepare, run_sync
from gatehouse import cli, operations
from gatehouse.errors import ProjectError
from gatehouse.project import Project, load_project
from test_usage import call, write


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


# --- `gatehouse versions --since`: calls in a window, pinned apps apart from apps that moved on -------------


def _versions_cli(shop: Project, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    monkeypatch.delenv("GATEHOUSE_PROJECT", raising=False)
    monkeypatch.setattr(cli.out, "width", 220)  # the table's cells whole, as in a wide terminal
    runner = CliRunner()
    return lambda *args: runner.invoke(cli.app, ["--project", str(shop.root), "versions", *args])


def test_versions_since_counts_the_window(shop: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_sync(prepare(shop))
    _append(shop, '\n[versions.v1]\nstatus = "deprecated"\nsunset = 2027-01-31\n')
    day = timedelta(days=1)
    run_sync(write(shop, [
        call("web", 1, 2 * day, target="products"), call("web", 1, 2 * day, target="products", n=1),
        call("web", 1, 3 * day, target="products", status=500), call("web", 1, 40 * day, target="products"),
        call("mobile", 1, 5 * day, target="products"), call("mobile", 2, day, target="products"),
        call("analytics", 2, timedelta(hours=1), target="orders"),
    ], tmp_path / "spool.jsonl"))
    versions = _versions_cli(shop, monkeypatch)

    def rows(*args: str) -> list[tuple[object, ...]]:
        result = versions(*args, "--format", "json")
        assert result.exit_code == 0, result.output
        return [(u["api_version"], u["app"], u["pinned"], u["moved_to"], u["calls"], u["errors"], u["status"])
                for u in json.loads(result.stdout)]

    deprecated = "deprecated (sunset 2027-01-31)"
    week = [(1, "web", True, None, 3, 1, deprecated), (1, "mobile", False, 2, 1, 0, deprecated),
            (2, "analytics", True, None, 1, 0, "current"), (2, "mobile", True, None, 1, 0, "current")]
    assert rows("--since", "7d") == week
    assert rows("--days", "7") == week  # --days N is --since Nd
    assert rows() == week  # the default window is 30 days: web's call of 40 days ago is out of it
    assert rows("--since", "60d")[0] == (1, "web", True, None, 4, 1, deprecated)
    ten_days_ago = (datetime.now(UTC) - 10 * day).date().isoformat()
    assert rows("--since", ten_days_ago) == week
    assert rows("--since", "12h") == [(2, "analytics", True, None, 1, 0, "current")]
    (web,) = [u for u in json.loads(versions("--since", "7d", "--format", "json").stdout) if u["app"] == "web"]
    assert web["per_day"] == pytest.approx(3 / 3, rel=1e-3) and web["targets"] == ["products"]  # since 3 days

    table = versions("--since", "7d")
    assert table.exit_code == 0, table.output
    assert "calls since" in table.stdout and "(7 days)" in table.stdout
    lines = {line.split("│")[3].strip() + " " + line.split("│")[2].strip(): line
             for line in table.stdout.splitlines() if line.count("│") > 8}
    assert set(lines) == {"web v1", "mobile v1", "analytics v2", "mobile v2"}
    assert deprecated in lines["web v1"] and "pinned" in lines["web v1"] and "1.0" in lines["web v1"]
    assert "moved to v2" in lines["mobile v1"] and "pinned" in lines["mobile v2"]


@pytest.mark.parametrize(("args", "message"), [
    (["--since", "7d", "--days", "7"], "give --since or --days, not both"),
    (["--since", "2999-01-01"], "--since 2999-01-01 is in the future"),
    (["--since", "last tuesday"], "cannot read the time 'last tuesday'"),
    (["--format", "xml"], "--format is table or json"),
])
def test_versions_refuses_a_window_it_cannot_read(shop: Project, monkeypatch: pytest.MonkeyPatch, args: list[str],
                                                  message: str) -> None:
    result = _versions_cli(shop, monkeypatch)(*args)
    assert result.exit_code == 1 and message in result.stderr, result.output
