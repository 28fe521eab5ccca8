"""A year of schema changes on the demo shop, with every app calling its pinned version throughout.

One real ``gatehouse serve`` runs from the first step to the last and is never restarted. Each step is what a
team would do: write a migration (and maybe a contract version or a gatehouse.toml change), ask
``migrate plan``, and then either ship it (``migrate``, ``lock``, ``apply``, ``check``) or, when the plan
refuses it, drop it. The test asserts that every breaking step is refused before anything ships, naming
exactly the apps pinned to the versions it would break; that no compatible step is refused; and that no
request of any app failed, nor ``/ready``, across every migration, apply and reload.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from conftest import ProjectFactory, run_sync
from gatehouse import operations
from gatehouse.check import run_check
from gatehouse.contracts.lockfile import read_lock, update_lock, write_lock
from gatehouse.contracts.signature import project_signatures
from gatehouse.observe.usage import affected_apps
from gatehouse.project import Project, load_project
from served import free_port

PRODUCTS_V3 = """-- Products with their SKU.
-- not null: id, name, price, stock
SELECT p.id, p.name, p.price, c.name AS category, p.stock, p.sku
FROM products AS p
LEFT JOIN categories AS c ON c.id = p.category_id
"""
PRODUCTS_V4 = """-- Products: `name` is now `title` (promised not null once every row has one).
-- not null: id, price, stock
SELECT p.id, p.title, p.price, c.name AS category, p.stock, p.sku
FROM products AS p
LEFT JOIN categories AS c ON c.id = p.category_id
"""
REVIEWS = """CREATE TABLE reviews (id bigserial PRIMARY KEY, product_id bigint NOT NULL REFERENCES products (id),
                      stars smallint NOT NULL CHECK (stars BETWEEN 1 AND 5));
INSERT INTO reviews (product_id, stars) SELECT id, 1 + id % 5 FROM products WHERE id <= 200;
"""
INVENTORY = """CREATE TABLE inventory (product_id bigint PRIMARY KEY REFERENCES products (id), stock bigint NOT NULL);
INSERT INTO inventory SELECT id, stock FROM products;
"""
MORE_PRODUCTS = """INSERT INTO products (name, title, price, cost, stock)
SELECT 'bulk ' || n, 'bulk ' || n, 9.99, 5, 1 FROM generate_series(1, 45000) AS n;
INSERT INTO inventory SELECT id, stock FROM products WHERE id NOT IN (SELECT product_id FROM inventory);
ALTER TABLE products ADD COLUMN slug text;
"""
BACKFILL = """-- gatehouse: batch 2000
UPDATE products SET slug = lower(replace(title, ' ', '-'))
WHERE id IN (SELECT id FROM products WHERE slug IS NULL LIMIT :batch_size FOR UPDATE SKIP LOCKED);
"""
PARTNER = """
[apps.partner]
description = "A partner's integration, built on API v6."
version = 6
grants = [
    { contract = "products", actions = ["read"] },
    { contract = "inventory", actions = ["read"] },
]

[[relations]]
from = "inventory.product_id"
to = "products.id"
"""


@dataclass
class Step:
    when: str
    what: str
    migrations: dict[str, str] = field(default_factory=dict)
    contracts: dict[str, str] = field(default_factory=dict)
    toml: Callable[[str], str] | None = None
    breaks: set[str] | None = None
    """None: compatible, it must ship. A set: breaking, refused, naming exactly these pinned apps."""


def _append(text: str) -> Callable[[str], str]:
    return lambda toml: toml + text


def _grant_reviews(toml: str) -> str:
    return toml.replace('    { contract = "customer_summary", actions = ["read"] },\n',
                        '    { contract = "customer_summary", actions = ["read"] },\n'
                        '    { contract = "reviews", actions = ["read"] },\n')


YEAR = [
    Step("Jan", "a new column, in a new contract version", {"V003__add_sku.sql": "ALTER TABLE products ADD "
         "COLUMN sku text;"}, {"products.v3.sql": PRODUCTS_V3}),
    Step("Feb", "widen stock to bigint (behind v2 and v3)", {"V004__stock_bigint.sql": "ALTER TABLE products "
         "ALTER COLUMN stock TYPE bigint;"}),
    Step("Mar", "widen prices to numeric(12,2)", {"V005__wider_prices.sql": "ALTER TABLE products ALTER COLUMN "
         "price TYPE numeric(12, 2);\nALTER TABLE order_items ALTER COLUMN unit_price TYPE numeric(12, 2);"}),
    Step("Apr", "the unsafe rename", {"V006__rename_name.sql": "ALTER TABLE products RENAME COLUMN name TO "
         "title;"}, breaks={"web", "mobile", "analytics"}),
    Step("Apr", "the safe rename: expand and backfill, then a new version", {
        "V006__add_title.sql": "ALTER TABLE products ADD COLUMN title text;",
        "V007__backfill_title.sql": "-- gatehouse: batch 1000\nUPDATE products SET title = name WHERE id IN "
                                    "(SELECT id FROM products WHERE title IS NULL LIMIT :batch_size);"},
         {"products.v4.sql": PRODUCTS_V4}),
    Step("May", "title becomes NOT NULL", {"V008__title_not_null.sql": "ALTER TABLE products ALTER COLUMN title "
         "SET NOT NULL;"}),
    Step("Jun", "name may be null (v1-v3 promise it never is)", {"V009__name_nullable.sql": "ALTER TABLE products "
         "ALTER COLUMN name DROP NOT NULL;"}, breaks={"web", "mobile", "analytics"}),
    Step("Jul", "narrow quantities to smallint", {"V009__small_quantities.sql": "ALTER TABLE order_items ALTER "
         "COLUMN quantity TYPE smallint;"}, breaks={"analytics"}),
    Step("Aug", "a new table and contract, granted to analytics", {"V009__reviews.sql": REVIEWS},
         {"reviews.v5.sql": "-- not null: id, product_id, stars\nSELECT id, product_id, stars FROM reviews"},
         toml=_grant_reviews),
    Step("Sep", "split stock into inventory; a declared relation duplicating the foreign key; a new app",
         {"V010__inventory.sql": INVENTORY},
         {"inventory.v6.sql": "-- not null: product_id, stock\nSELECT product_id, stock FROM inventory"},
         toml=_append(PARTNER)),
    Step("Oct", "drop products.stock while v2-v6 serve it", {"V011__drop_stock.sql": "ALTER TABLE products DROP "
         "COLUMN stock;"}, breaks={"mobile", "analytics", "partner"}),
    Step("Nov", "deprecate v1", toml=_append('\n[versions.v1]\nstatus = "deprecated"\nsunset = 2027-06-30\n')),
    Step("Nov", "retire v1 once nobody is pinned to it",
         toml=lambda toml: toml.replace('status = "deprecated"', 'status = "retired"').replace(
             'Still on API v1."\nversion = 1', 'Now on API v6."\nversion = 6')),
    Step("Dec", "45,000 more products and a 50,000-row backfill in batches",
         {"V011__more_products.sql": MORE_PRODUCTS, "V012__backfill_slug.sql": BACKFILL}),
    Step("Dec", "status becomes varchar(20)", {"V013__short_status.sql": "ALTER TABLE orders ALTER COLUMN status "
         "TYPE varchar(20);"}, breaks={"analytics"}),
    Step("Dec", "an index, built concurrently", {"V013__title_index.sql": "-- gatehouse: no-transaction\n"
         "CREATE INDEX CONCURRENTLY products_title_idx ON products (title);"}),
]


class Traffic(threading.Thread):
    """Every app calls its pinned version, request after request, and ``/ready`` is asked between rounds."""

    def __init__(self, url: str, admin: str, keys: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.url, self.admin, self.keys = url, admin, keys
        self.web_version = 1
        self.step = "start"
        self.counts: dict[str, int] = {}
        self.failures: list[str] = []
        self.stopping = threading.Event()

    def calls(self) -> list[tuple[str, str, str, dict[str, object] | None]]:
        web = ("/products?select=id,name,price&order=id&limit=5" if self.web_version == 1
               else "/products?select=id,title,price&order=id&limit=5")
        calls: list[tuple[str, str, str, dict[str, object] | None]] = [
            ("web", f"v{self.web_version}", web, None),
            ("mobile", "v2", "/products?select=id,name,price,stock&order=id&limit=5", None),
            ("analytics", "v2", "/orders?select=id,status&limit=5", None),
            ("analytics", "v2", "/products?select=category,stock&order=id&limit=5", None),
            ("analytics", "v2", "/customer_summary?limit=3", None),
            ("analytics", "v2", "/order_items?select=quantity,unit_price&limit=5", None),
            ("analytics", "v2", "/rpc/order_total", {"order_id": 1}),
        ]
        if "partner" in self.keys:
            calls.append(("partner", "v6", "/products?select=id,title,inventory(stock)&order=id&limit=3", None))
        return calls

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client, httpx.Client(timeout=10) as admin:
            while not self.stopping.is_set():
                for app, version, path, body in self.calls():
                    headers = {"apikey": self.keys[app], "Accept-Profile": version}
                    try:
                        answer = (client.post(path, json=body, headers=headers) if body is not None
                                  else client.get(path, headers=headers))
                        ok = answer.status_code == 200 and bool(answer.json())
                    except httpx.HTTPError as exc:
                        ok, answer = False, None
                        self.failures.append(f"{self.step}: {app} {path}: {type(exc).__name__}")
                    if not ok and answer is not None:
                        self.failures.append(f"{self.step}: {app} {version} {path}: {answer.status_code} "
                                             f"{answer.text[:300]}")
                    self.counts[app] = self.counts.get(app, 0) + 1
                ready = admin.get(f"{self.admin}/ready")
                if ready.status_code != 200:
                    self.failures.append(f"{self.step}: /ready {ready.status_code} {ready.text[:300]}")


def _serve(project: Project) -> tuple[subprocess.Popen[bytes], int, int]:
    port, admin_port = free_port(), free_port()
    log = (project.root / "serve.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "gatehouse", "--project", str(project.root), "serve",
                                "--port", str(port), "--admin-port", str(admin_port)], env=dict(os.environ),
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{admin_port}/ready", timeout=1).status_code == 200:
                return process, port, admin_port
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError((project.root / "serve.log").read_text()[-2000:])


def _write(root: Path, step: Step) -> list[Path]:
    written = []
    for folder, files in (("migrations", step.migrations), ("contracts", step.contracts)):
        for name, text in files.items():
            path = root / folder / name
            path.write_text(text)
            written.append(path)
    if step.toml is not None:
        toml = root / "gatehouse.toml"
        toml.write_text(step.toml(toml.read_text()))
    return written


async def _ship(root: Path) -> list[str]:
    """What a team runs after a plan passed: migrate, lock, apply, check (errors only are returned)."""
    project = load_project(root)
    await operations.migrate_all(project)
    lock, report = update_lock(project, await project_signatures(project), read_lock(root))
    assert report.ok, report.lines()
    write_lock(root, lock)
    await operations.apply_all(project)
    return [f"{f.code} {f.message}" for f in await run_check(root) if f.severity == "error"]


def _wait_for_audit() -> None:
    time.sleep(1.5)  # reads are audited in batches, a moment after the answer


def test_a_year_of_schema_changes_breaks_no_pinned_app(make_project: ProjectFactory) -> None:
    project = make_project(from_shop=True)
    root = project.root
    run_sync(operations.migrate_all(project))
    run_sync(operations.apply_all(project))
    keys = {app: run_sync(operations.create_key(project, app)).secret_key for app in project.apps}
    process, port, admin_port = _serve(project)
    traffic = Traffic(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", keys)
    traffic.start()
    refused: dict[str, list[str]] = {}
    try:
        _wait_for_audit()
        for step in YEAR:
            traffic.step = f"{step.when}: {step.what}"
            if step.what.startswith("retire v1"):
                traffic.web_version = 6  # web moves first; the retirement waits until nobody is pinned to v1
                _wait_for_audit()
                users = run_sync(_users_of_v1(load_project(root)))
                assert [use.app for use in users if use.pinned] == [], users
            written = _write(root, step)
            plans = run_sync(operations.plan_all(load_project(root)))
            would_break = sorted({app for plan in plans for impact in plan.breaking for app in impact.would_break})
            if step.breaks is not None:
                assert any(plan.breaking for plan in plans), f"{step.what}: not refused"
                assert would_break == sorted(step.breaks), f"{step.what}: names {would_break}"
                refused[step.what] = would_break
                for path in written:
                    path.unlink()
                continue
            assert not any(plan.breaking or plan.failure for plan in plans), f"{step.what}: refused {plans}"
            errors = run_sync(_ship(root))
            assert errors == [], f"{step.what}: check found {errors}"
            if step.toml is not None and "[apps.partner]" in step.toml(""):
                keys["partner"] = run_sync(operations.create_key(load_project(root), "partner")).secret_key
                traffic.keys = dict(keys)
            time.sleep(0.5)  # traffic runs on the new state for a moment
        assert process.poll() is None, "the server stopped"
    finally:
        traffic.stopping.set()
        traffic.join(20)
        process.terminate()
        process.wait(20)
    assert traffic.failures == [], "\n".join(traffic.failures[:20])
    assert len(refused) == sum(step.breaks is not None for step in YEAR)
    assert min(traffic.counts.values()) > 50, traffic.counts
    log = (root / "serve.log").read_text()
    assert "Traceback" not in log and log.count("reloaded:") >= len(YEAR) - len(refused)


async def _users_of_v1(project: Project) -> list[object]:
    async with operations.owner_connection(project) as conn:
        return list(await affected_apps(conn, "products", (1,)))
