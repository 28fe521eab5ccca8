"""The console's HTTP pieces: templates rendered, every answer with the security headers, forms read,
bundled static files served.

Every page carries a Content-Security-Policy that allows scripts, styles and requests from the console itself
only (no inline script or style, no eval), denies framing, and is never cached: pages show keys and audit.
"""

from __future__ import annotations

import mimetypes
from datetime import datetime
from http.cookies import SimpleCookie
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from gatehouse.http.exchange import HttpRequest, HttpResponse

PREFIX = "/console"
HTML = "text/html; charset=utf-8"
MAX_FORM_BYTES = 16_384
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # with no-referrer, a browser's POST says ``Origin: null``
    "Cache-Control": "no-store",
}
_STATIC = resources.files("gatehouse.admin").joinpath("static")


def _when(value: datetime | None) -> str:
    return "" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


_env = Environment(loader=PackageLoader("gatehouse.admin", "templates"), autoescape=select_autoescape(default=True),
                   undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_env.filters["when"] = _when
_env.globals["prefix"] = PREFIX


def render(template: str, status: int = 200, headers: dict[str, str] | None = None, **context: Any) -> HttpResponse:
    body = _env.get_template(template).render(**context).encode()
    return HttpResponse(status, {**SECURITY_HEADERS, **(headers or {})}, body, HTML)


def error_page(status: int, title: str, message: str, session: object = None) -> HttpResponse:
    return render("error.html", status, title=title, message=message, session=session)


def redirect(location: str, headers: dict[str, str] | None = None) -> HttpResponse:
    """303: after a POST the browser GETs the next page, so reloading it never repeats the change."""
    return HttpResponse(303, {**SECURITY_HEADERS, "Location": location, **(headers or {})})


def cookies(request: HttpRequest) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(request.headers.get("cookie", ""))
    except Exception:  # a malformed Cookie header signs nobody in
        return {}
    return {name: morsel.value for name, morsel in jar.items()}


def set_cookie(request: HttpRequest, name: str, value: str, max_age: int) -> str:
    """A ``Set-Cookie`` value: HttpOnly, SameSite=Strict, scoped to the console, Secure over TLS."""
    secure = "; Secure" if request.scheme == "https" else ""
    return f"{name}={value}; Path={PREFIX}; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"


async def form(request: HttpRequest) -> dict[str, str] | None:
    """An urlencoded form's fields, or None when the body is not one (too large, another type, not UTF-8)."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        return None
    try:
        body = await request.body(MAX_FORM_BYTES)
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict"))
    except Exception:  # 408/413 from the body, or bytes that are not UTF-8: the page says the form was refused
        return None


def same_origin(request: HttpRequest) -> bool:
    """A browser says where a POST comes from (``Sec-Fetch-Site``, ``Origin``); when it does, it must be this
    console. A client that says neither (curl, tests) still needs the CSRF token."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return origin != "null" and origin.partition("://")[2] == request.headers.get("host", "")


def query_url(path: str, params: dict[str, str], **changes: str | int) -> str:
    """``path`` with the non-empty ``params`` and ``changes`` as its query: stable URLs for every list."""
    merged = {k: str(v) for k, v in {**params, **changes}.items() if str(v) != ""}
    return f"{path}?{urlencode(merged)}" if merged else path


def static_file(relative: str) -> HttpResponse | None:
    """A file bundled under ``static/``; None for anything else (no ``..``, no hidden files)."""
    parts = relative.split("/")
    if not relative or any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return None
    node = _STATIC
    for part in parts:
        node = node.joinpath(part)
    if not node.is_file():
        return None
    media = mimetypes.guess_type(parts[-1])[0] or "application/octet-stream"
    if media.startswith("text/") or media == "application/javascript":
        media += "; charset=utf-8"
    headers = {**SECURITY_HEADERS, "Cache-Control": "public, max-age=3600"}
    return HttpResponse(200, headers, node.read_bytes(), media)
