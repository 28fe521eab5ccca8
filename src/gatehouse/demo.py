"""``gatehouse demo``: the bundled shop, from nothing to a served API with four applications.

The example is copied into a folder of the user's (its embedded database lives there too, so a second run
reuses it and starts in about a second). Each run revokes the previous demo keys and makes new ones.

The shop is three services, each with its database: ``shop`` (products, orders, ...), ``reviews`` (linked to
the products by a ``[[relations]]`` entry, so the tour shows an embed across databases) and ``payments`` (which
the ``checkout`` app's saga charges between holding stock and writing the order). All live in the one
embedded PostgreSQL. :func:`copy_shop` can also leave the other services out, which gives the shop as a
project of one database: what the tests and benchmarks about one database start from.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
from dataclasses import replace
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from gatehouse import operations
from gatehouse.contracts.lockfile import Lock, read_lock, write_lock
from gatehouse.errors import ProjectError
from gatehouse.project import CONFIG_FILE, STATE_DIR, Project, load_project

DEMO_KEY_NOTE = "created by gatehouse demo"
CONSOLE_TOKEN = "GATEHOUSE_CONSOLE__ADMIN_TOKEN"
"""The console's admin token as the environment gives it (``[console] admin_token`` overridden, docs/console.md)."""
HOME = "shop"
"""The shop's own database (the first, which holds the keys)."""
OTHER_SERVICES = ("reviews", "payments")
"""The databases of the shop's other services."""
CHECKOUT_APP = "checkout"
CHECKOUT_FILES = ("logic/checkout.py", f"contracts/{HOME}/stock.v1.sql")
"""What the checkout saga adds to the shop's own database; it charges in payments, so it goes with it."""


def bundled_example() -> Path:
    """The shop example: inside the installed package, or at the repository root in a source checkout."""
    packaged = Path(str(resources.files("gatehouse"))) / "examples" / "shop"
    if (packaged / CONFIG_FILE).exists():
        return packaged
    source = Path(__file__).resolve().parents[2] / "examples" / "shop"
    if (source / CONFIG_FILE).exists():
        return source
    raise ProjectError("the bundled example is missing from this installation",
                       hint="reinstall gatehouse, or run from a source checkout")


def copy_shop(target: Path, *, services: bool = True) -> None:
    """Copy the bundled shop into ``target`` (which may exist), never with the example's own ``.gatehouse/``.

    ``services=False`` leaves the other services out (reviews, payments, and the checkout app and saga that
    need payments): the copy is then the shop as a project of one database, with its contracts and migrations
    straight in ``contracts/`` and ``migrations/`` (where a one-database project has them, and where tests
    write theirs) and its lock without the contracts left out. That is two databases less to create for every
    test that starts from the shop.
    """
    # never the example's own .gatehouse/ (a database someone ran in place): a copy gets a fresh one
    shutil.copytree(bundled_example(), target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(STATE_DIR))
    if services:
        return
    for relative in CHECKOUT_FILES:
        (target / relative).unlink()
    for folder in (target / "contracts", target / "migrations"):
        for other in OTHER_SERVICES:
            shutil.rmtree(folder / other)
        for path in (folder / HOME).iterdir():
            path.rename(folder / path.name)
        (folder / HOME).rmdir()
    config = target / CONFIG_FILE
    config.write_text(without_services(config.read_text(encoding="utf-8")), encoding="utf-8")
    lock = read_lock(target)
    if lock is not None:
        moved = [replace(entry, file=entry.file.replace(f"contracts/{HOME}/", "contracts/", 1))
                 for entry in lock.entries]
        kept = [entry for entry in moved if (target / entry.file).exists()]
        names = {entry.signature.contract for entry in kept}
        write_lock(target, Lock(tuple(  # (and without relations to the contracts left out)
            replace(entry, signature=replace(entry.signature, relations=tuple(
                r for r in entry.signature.relations if r.target in names))) for entry in kept), lock.format))


def without_services(config: str) -> str:
    """The shop's ``gatehouse.toml`` (or a text that starts from it) without its other services: their
    databases, the grants and the relation naming the reviews, and the checkout app. Anything else is left."""
    tables = re.split(r"(?m)^(?=\[)", config)  # each table from its header to the next one
    dropped = (*(f"[databases.{name}]" for name in OTHER_SERVICES), f"[apps.{CHECKOUT_APP}]")
    kept = [table for table in tables
            if not table.startswith(dropped)
            and not (table.startswith("[[relations]]") and '"reviews.' in table)]
    return re.sub(r'(?m)^[ \t]*\{ contract = "reviews",.*\n', "", "".join(kept))


def free_port(preferred: int, host: str = "127.0.0.1") -> int:
    from gatehouse.server import bind_probe  # the same test `gatehouse serve` makes before it starts

    for candidate in (preferred, 0):
        try:
            return bind_probe(host, candidate)
        except OSError:
            continue
    raise ProjectError("no free TCP port on this machine")


async def _set_up(project: Project, console: Console) -> dict[str, str]:
    with console.status("starting PostgreSQL and applying migrations..."):
        done = await operations.migrate_all(project)
    for database, migrations in done.items():
        for migration, seconds in migrations:
            console.print(f"[green]{database}[/]: applied {migration.label} ({seconds * 1000:.0f} ms)")
    with console.status("creating views, roles and grants..."):
        reports = await operations.apply_all(project)
    changes = sum(len(r.changes) for r in reports)
    console.print(f"[green]apply[/]: {changes} change(s)" if changes else "[green]apply[/]: nothing to change")
    keys: dict[str, str] = {}
    for app in project.apps:
        for old in await operations.list_keys(project, app):
            if old.description == DEMO_KEY_NOTE and old.revoked_at is None:
                await operations.revoke_keys(project, app, old.id)
        new = await operations.create_key(project, app, description=DEMO_KEY_NOTE)
        keys[app] = new.secret_key
    return keys


def tour(keys: dict[str, str], base: str, admin: str) -> list[tuple[str, str]]:
    web, mobile, analytics, checkout = keys["web"], keys["mobile"], keys["analytics"], keys[CHECKOUT_APP]
    order = ("-H 'Content-Type: application/json' "
             "-d '{\"customer_id\": %d, \"items\": [{\"product_id\": 5, \"quantity\": 2}]}'")
    return [
        ("web is pinned to API v1: products have id, name, price",
         f"curl -s '{base}/products?id=lte.3' -H 'apikey: {web}'"),
        ("analytics gets API v2 from the same URL: category and stock too",
         f"curl -s '{base}/products?id=lte.3' -H 'apikey: {analytics}'"),
        ("each product with its reviews, which live in the reviews service's own database: one request, one "
         "query per database ([[relations]] in gatehouse.toml)",
         f"curl -s '{base}/products?select=id,name,reviews(stars,body)&id=lte.3' -H 'apikey: {mobile}'"),
        ("mobile may not read orders: 404, exactly as if they did not exist",
         f"curl -s '{base}/orders?limit=3' -H 'apikey: {mobile}'"),
        ("analytics may: its five best customers",
         f"curl -s '{base}/customer_summary?select=name,order_count,total_spent&order=total_spent.desc&limit=5'"
         f" -H 'apikey: {analytics}'"),
        ("any app can ask for a version by path; filters and order work as in PostgREST",
         f"curl -s '{base}/v2/products?category=eq.books&price=lt.20&order=price.desc&limit=3' "
         f"-H 'apikey: {mobile}'"),
        ("business logic in Python (logic/pricing.py): an order's total after the customer's discount",
         f"curl -s {base}/rpc/order_total -H 'apikey: {analytics}' -H 'Content-Type: application/json' "
         "-d '{\"order_id\": 7}'"),
        ("checkout places an order across three services with a saga (logic/checkout.py): stock held in the "
         "shop's database, the customer charged in the payments service's, the order written in the shop's; "
         "Prefer: wait answers with the outcome, and the same Idempotency-Key never places a second order",
         f"curl -s {base}/sagas/place_order -H 'apikey: {checkout}' -H 'Prefer: wait=10' "
         f"-H 'Idempotency-Key: demo-order-1' {order % 3}"),
        ("customer 10 has nothing left to spend: the charge is declined, and the stock held for the order is "
         "put back (the saga ends compensated)",
         f"curl -s {base}/sagas/place_order -H 'apikey: {checkout}' -H 'Prefer: wait=10' {order % 10}"),
        ("mobile may make 20 requests a second: beyond that, 429 with Retry-After (the RateLimit fields say "
         "what is left; #[1-30] makes curl send the URL 30 times at once, and is never sent)",
         f"curl -s -o /dev/null -w '%{{http_code}} ' '{base}/products?limit=1#[1-30]' -H 'apikey: {mobile}'; "
         f"echo; curl -si '{base}/products?limit=1' -H 'apikey: {mobile}' | grep -i '^ratelimit'"),
        ("products are cached: the same read twice, and the second answer comes from memory (a write to the "
         "tables behind it, through gatehouse or in SQL, ends that at once); an ETag is answered 304",
         f"for i in 1 2; do curl -si '{base}/products?id=eq.5' -H 'apikey: {web}' | grep -i '^cache-status'; done; "
         f"curl -s -o /dev/null -w '%{{http_code}}\\n' '{base}/products?id=eq.5' -H 'apikey: {web}' "
         f"-H \"If-None-Match: $(curl -si '{base}/products?id=eq.5' -H 'apikey: {web}' | "
         "sed -n 's/^etag: //Ip' | tr -d '\\r')\""),
        ("the OpenAPI 3.1 document of what this app may use (Swagger UI: open /docs in a browser)",
         f"curl -s {base}/ -H 'apikey: {mobile}' | head -c 300; echo"),
        ("no key, or a wrong one: 401 before any database work",
         f"curl -s '{base}/products' -H 'apikey: gh_0000000000_{'x' * 43}'"),
        ("metrics per app, contract and version",
         f"curl -s {admin}/metrics | grep '^gatehouse_requests_total'"),
    ]


def run_demo(directory: Path, *, port: int, admin_port: int, serve: bool, console: Console) -> None:
    directory = directory.resolve()
    if not (directory / CONFIG_FILE).exists():
        if directory.exists() and any(directory.iterdir()):
            raise ProjectError(f"{directory} exists and is not a gatehouse project",
                               hint="choose another place with --dir")
        copy_shop(directory)
        console.print(f"copied the shop example to [bold]{directory}[/]")
    else:
        console.print(f"using the demo project in [bold]{directory}[/]")
    # the console's admin token: the one in the environment, else a new one, for this process's server
    token = os.environ.get(CONSOLE_TOKEN) or secrets.token_urlsafe(24)
    os.environ[CONSOLE_TOKEN] = token
    project = load_project(directory)
    keys = asyncio.run(_set_up(project, console))

    host = project.config.server.host
    port, admin_port = free_port(port, host), free_port(admin_port, host)
    base, admin = f"http://{host}:{port}", f"http://{host}:{admin_port}"
    console.rule("[bold]gatehouse demo")
    for app, key in keys.items():
        console.print(f"[bold]{app}[/] key: ", end="")
        print(key)
    console.print()
    for caption, command in tour(keys, base, admin):
        console.print(f"[dim]# {escape(caption)}[/]")  # (a caption may hold brackets: [[relations]])
        print(command)
    console.print()
    if serve:
        console.print(f"[bold]console[/]: {admin}/console, signed in with this admin token:")
    else:
        console.print(f"[bold]console[/]: run `{CONSOLE_TOKEN}=<token> gatehouse serve` in {directory}, then open "
                      f"{admin}/console and sign in with the token, e.g. this one:")
    print(token)
    console.print()
    if not serve:
        return
    console.print(f"serving on {base} (admin {admin}); press Ctrl-C to stop.\n")

    from gatehouse.event_loop import run_in_loop
    from gatehouse.observe.logs import configure_logging
    from gatehouse.runtime import Runtime
    from gatehouse.server import serve as serve_forever

    configure_logging("info")
    run_in_loop(serve_forever(Runtime(project), host=host, port=port, admin_host=host, admin_port=admin_port))
