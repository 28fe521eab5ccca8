"""The `gatehouse` command end to end, as a user runs it: real processes, real ports, embedded PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from gatehouse import cli
from gatehouse.demo import tour
from served import serving

GATEHOUSE = [sys.executable, "-m", "gatehouse"]


def gatehouse(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
              check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*GATEHOUSE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    if check and result.returncode != 0:
        raise AssertionError(f"gatehouse {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_help_and_version() -> None:
    assert "gatehouse" in gatehouse("--version").stdout
    top = gatehouse("--help").stdout
    for command in ("migrate", "apply", "keys", "serve", "demo"):
        assert command in top
    runner = CliRunner()  # each command's own help in this process: the entry point is the one checked above
    for command in (["keys", "create"], ["keys", "list"], ["keys", "revoke"], ["keys", "rotate"], ["serve"],
                    ["apply"], ["demo"], ["init"], ["migrate"]):
        result = runner.invoke(cli.app, [*command, "--help"])
        assert result.exit_code == 0 and "--help" in result.stdout, (command, result.output)


def test_project_errors_are_clear(tmp_path: Path) -> None:
    result = gatehouse("--project", str(tmp_path), "apply", check=False)
    assert result.returncode == 1
    assert "no gatehouse.toml here" in result.stderr and "Traceback" not in result.stderr


def test_a_file_given_as_the_project_is_a_clear_error(tmp_path: Path) -> None:
    """--project naming a file (its own gatehouse.toml, most often) is refused, naming the folder to pass."""
    toml = tmp_path / "api" / "gatehouse.toml"
    gatehouse("init", str(toml.parent))
    result = gatehouse("--project", str(toml), "apply", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{toml} is the project's settings file, not its folder" in result.stderr
    assert f"--project {toml.parent}" in result.stderr
    other = tmp_path / "notes.txt"
    other.write_text("not a project")
    for given in (other, other / "api"):
        result = gatehouse("--project", str(given), "migrate", check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"{other} is a file" in result.stderr
        assert "takes the folder that holds gatehouse.toml" in result.stderr


def test_a_typo_in_gatehouse_toml_is_one_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "api"
    gatehouse("init", str(folder))
    toml = folder / "gatehouse.toml"
    toml.write_text(toml.read_text().replace("pool_size = 5", "pool_sise = 5"))
    result = gatehouse("--project", str(folder), "migrate", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{toml}: invalid settings" in result.stderr
    assert "apps.example.quota.pool_sise: unknown setting; did you mean pool_size?" in result.stderr
    env = {**os.environ, "GATEHOUSE_SERVER__PORTT": "8080"}
    toml.write_text(toml.read_text().replace("pool_sise = 5", "pool_size = 5"))
    from_env = gatehouse("--project", str(folder), "apply", env=env, check=False)
    assert from_env.returncode == 1
    assert "GATEHOUSE_SERVER__PORTT (in the environment) sets server.portt" in from_env.stderr
    assert "did you mean GATEHOUSE_SERVER__PORT?" in from_env.stderr


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The demo on the embedded PostgreSQL (no URL anywhere), set up once for this module."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_")}
    folder = tmp_path_factory.mktemp("demo") / "shop"
    result = gatehouse("demo", "--dir", str(folder), "--no-serve", env=env)
    assert "applied V002 generate demo data" in result.stdout
    assert "reviews: applied V002 generate demo reviews" in result.stdout  # the second service's database
    assert "payments: applied V002 generate demo accounts" in result.stdout  # and the third's
    assert "curl -s" in result.stdout
    assert "([[relations]] in gatehouse.toml)" in result.stdout  # captures are printed as they are, not as markup
    console = result.stdout.split("console: run `GATEHOUSE_CONSOLE__ADMIN_TOKEN=<token> gatehouse serve`", 1)
    assert len(console) == 2 and "/console and sign in with the token" in console[1], result.stdout
    yield folder


def test_serve_on_a_port_in_use_says_so(demo_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = gatehouse("serve", "--port", str(port), "--admin-port", str(free_port()), cwd=demo_dir, env=env,
                           check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 2
    assert f"cannot listen on 127.0.0.1:{port} for the data port" in result.stderr and "--port" in result.stderr
    same = gatehouse("serve", "--port", str(port), "--admin-port", str(port), cwd=demo_dir, env=env, check=False)
    assert same.returncode == 1 and "the data and admin ports are both" in same.stderr


def test_a_port_in_use_is_said_before_the_embedded_database_starts(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_")}
    gatehouse("init", str(tmp_path / "fresh"), env=env)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = gatehouse("serve", "--port", str(free_port()), "--admin-port", str(port), cwd=tmp_path / "fresh",
                           env=env, check=False)
    # the project was never migrated nor applied: had its database been started, its login would have failed first
    assert result.returncode == 1 and f"cannot listen on 127.0.0.1:{port} for the admin port" in result.stderr
    assert "--admin-port" in result.stderr and "database" not in result.stderr
    assert not (tmp_path / "fresh" / ".gatehouse").exists()


def test_demo_runs_on_embedded_postgres_and_serves(demo_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_")}
    assert (demo_dir / ".gatehouse" / "pgdata" / "PG_VERSION").exists()
    again = gatehouse("apply", cwd=demo_dir, env=env)
    assert "nothing to change" in again.stdout
    keys = {app: gatehouse("keys", "create", app, "--quiet", cwd=demo_dir, env=env).stdout.strip()
            for app in ("web", "mobile", "analytics", "checkout")}
    console_token = "the-demo-console-token-0123456789"  # as the demo tells a user to give it
    with serving(demo_dir, env={**env, "GATEHOUSE_CONSOLE__ADMIN_TOKEN": console_token}) as server:
        base, admin = server.base, server.admin
        assert httpx.get(f"{admin}/live").json() == {"status": "live"}
        with httpx.Client(base_url=admin) as browser:  # the console signs in with that token, and no other
            for token, lands in (("wrong-token", 401), (console_token, 303)):
                form = browser.get("/console/signin")
                csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
                assert form.status_code == 200 and csrf is not None, form.text
                signed = browser.post("/console/signin", data={"csrf": csrf.group(1), "token": token, "next": ""})
                assert signed.status_code == lands, signed.text
            assert "mobile" in browser.get("/console/apps").text
        web = httpx.get(f"{base}/products?id=eq.1", headers={"apikey": keys["web"]}).json()
        analytics = httpx.get(f"{base}/products?id=eq.1", headers={"apikey": keys["analytics"]}).json()
        assert set(web[0]) == {"id", "name", "price"}
        assert set(analytics[0]) == {"id", "name", "price", "category", "stock"}
        refused = httpx.get(f"{base}/orders", headers={"apikey": keys["mobile"]})
        assert refused.status_code == 404
        # a chunked upload is read like one that declares its length
        chunked = httpx.post(f"{base}/rpc/order_total", headers={"apikey": keys["analytics"]},
                             content=iter([b'{"order_id":', b' 1}']))
        declared = httpx.post(f"{base}/rpc/order_total", headers={"apikey": keys["analytics"]},
                              json={"order_id": 1})
        assert chunked.status_code == declared.status_code == 200, chunked.text
        assert chunked.json() == declared.json()
        assert httpx.get(f"{admin}/nothing").status_code == 404
        # refused by the HTTP layer itself (no app, no handler): still counted
        assert httpx.get(f"{base}/products?" + "a" * 9000, headers={"apikey": keys["web"]}).status_code == 414
        metrics = httpx.get(f"{admin}/metrics").text
        assert ('gatehouse_requests_total{app="",contract="",method="OTHER",status="414",version=""} 1.0'
                in metrics)
        assert ('gatehouse_requests_total{app="web",contract="products",method="GET",status="200",'
                'version="v1"} 1.0') in metrics
        assert "gatehouse_request_duration_seconds_bucket" in metrics
        # the tour's printed commands do what they say: mobile's rate limit, the cache on products
        shown = {what: command for what, command in tour(keys, base, admin)}
        limited = next(command for what, command in shown.items() if "429" in what)
        out = subprocess.run(["bash", "-c", limited], capture_output=True, text=True, timeout=60).stdout
        assert "200" in out and "429" in out.split("\n")[0] and "ratelimit:" in out.lower(), out
        cached = next(command for what, command in shown.items() if "cached" in what)
        out = subprocess.run(["bash", "-c", cached], capture_output=True, text=True, timeout=60).stdout
        lines = out.lower().split("\n")
        assert lines[0].startswith("cache-status: gatehouse; fwd=miss; stored"), out
        assert lines[1].startswith("cache-status: gatehouse; hit; ttl="), out
        assert lines[2] == "304", out
        # products with their reviews, from the reviews service's database (the demo data is deterministic)
        embed = next(command for what, command in shown.items() if "reviews" in what)
        out = subprocess.run(["bash", "-c", embed], capture_output=True, text=True, timeout=60).stdout
        assert [(p["id"], p["name"], sorted((r["stars"], r["body"]) for r in p["reviews"]))
                for p in json.loads(out)] == [
            (1, "Blue mug #1", [(4, "Good value for the price.")]),
            (2, "Green chair #2", [(1, "Broke within a week."), (4, "Good value for the price.")]),
            (3, "Small kettle #3", [])], out
        # an order placed across the three databases by the saga, and the declined one undone
        placed, declined = (json.loads(subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                                                      timeout=60).stdout)
                            for what, command in shown.items() if "/sagas/" in command)
        assert (placed["state"], placed["steps_done"], set(placed["result"])) == (
            "completed", 3, {"order_id", "charge_id", "amount"}), placed
        assert declined["state"] == "compensated" and "payment declined: customer 10" in declined["error"], declined
    stderr = server.stderr
    assert server.returncode == 0, stderr
    for key in keys.values():
        assert key not in stderr
    assert '"app": "web"' in stderr.replace('":"', '": "')  # one structured line per request
    # the embedded server stops with the last process that used it
    deadline = time.monotonic() + 20
    while (demo_dir / ".gatehouse" / "pgdata" / "postmaster.pid").exists():
        assert time.monotonic() < deadline, "embedded PostgreSQL still running"
        time.sleep(0.2)


def test_keys_list_and_revoke(demo_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_")}
    created = gatehouse("keys", "create", "web", "--expires", "30d", "--description", "ci", cwd=demo_dir, env=env)
    key = next(line for line in created.stdout.splitlines() if line.startswith("gh_"))
    key_id = key.split("_")[1]
    listed = gatehouse("keys", "list", "web", cwd=demo_dir, env=env).stdout
    assert key_id in listed and key not in listed
    revoked = gatehouse("keys", "revoke", "web", key_id, cwd=demo_dir, env=env)
    assert key_id in revoked.stdout
    assert "revoked" in gatehouse("keys", "list", "web", cwd=demo_dir, env=env).stdout
    unknown = gatehouse("keys", "create", "nobody", cwd=demo_dir, env=env, check=False)
    assert unknown.returncode == 1 and "no application named 'nobody'" in unknown.stderr
    past = gatehouse("keys", "create", "web", "--expires", "2001-01-01", cwd=demo_dir, env=env, check=False)
    assert past.returncode == 1 and "in the past" in past.stderr


def test_init_creates_a_project_that_loads(tmp_path: Path) -> None:
    from gatehouse.project import load_project

    folder = tmp_path / "my-api"
    result = gatehouse("init", str(folder))
    assert "gatehouse.toml" in result.stdout
    project = load_project(folder)
    assert project.name == "my_api" and project.versions.resolve(1, "notes") is not None
    again = gatehouse("init", str(folder), check=False)
    assert again.returncode == 1 and "already exists" in again.stderr
