"""``GET /docs``: Swagger UI for the caller's OpenAPI document.

The document at ``/`` is per application and needs its key, so the page first asks for the key, loads the
document with it, and pre-fills Swagger UI's Authorize dialog with the same key, so "Try it out" works at
once. The key stays in the tab's sessionStorage; it is never put in a URL.

Swagger UI's files come from the ``swagger-ui-bundle-v2`` wheel (Swagger UI 5, the first major version that
renders OpenAPI 3.1) and are served under ``/docs/static/`` by :func:`static_file`; without the wheel
the page falls back to the same pinned version on the jsDelivr CDN.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import mimetypes
import re
from functools import cache
from pathlib import Path

from gatehouse.errors import InvalidPath, MethodNotAllowed
from gatehouse.http.exchange import HttpRequest, HttpResponse

SWAGGER_UI_VERSION = "5.31.0"
CDN = f"https://cdn.jsdelivr.net/npm/swagger-ui-dist@{SWAGGER_UI_VERSION}"
STATIC_PATH = "/docs/static"

PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>API documentation</title>
  <link rel="stylesheet" href="__ASSETS__/swagger-ui.css">
  <style>
    body { margin: 0; font-family: sans-serif; }
    #key-bar { display: flex; gap: .5em; align-items: center; padding: .75em 1.25em; background: #1b1b1b;
               color: #fff; }
    #key-bar input { flex: 0 1 32em; padding: .35em; font-family: monospace; }
    #key-bar output { color: #f99; }
  </style>
</head>
<body>
  <form id="key-bar">
    <label for="apikey">API key</label>
    <input id="apikey" type="password" autocomplete="off" placeholder="gh_..." required>
    <button type="submit">Load the API</button>
    <button type="button" id="forget">Forget the key</button>
    <output id="status"></output>
  </form>
  <div id="swagger-ui"></div>
  <script src="__ASSETS__/swagger-ui-bundle.js"></script>
  <script>
  (function () {
    const specUrl = __SPEC_URL__;
    const stored = "gatehouse.apikey";
    const form = document.getElementById("key-bar");
    const input = document.getElementById("apikey");
    const status = document.getElementById("status");

    function show(key) {
      status.textContent = "";
      let loading = false;
      const ui = SwaggerUIBundle({
        url: specUrl,
        dom_id: "#swagger-ui",
        deepLinking: true,
        presets: [SwaggerUIBundle.presets.apis],
        layout: "BaseLayout",
        // Only the document itself is fetched with the key here; "Try it out" uses the Authorize dialog.
        requestInterceptor: function (request) {
          if (request.loadSpec) { request.headers["apikey"] = key; loading = true; }
          return request;
        },
        responseInterceptor: function (response) {
          if (loading && response.status === 401) { status.textContent = "This key was refused."; }
          loading = false;
          return response;
        },
        onComplete: function () { ui.preauthorizeApiKey("apiKey", key); },
      });
    }

    form.addEventListener("submit", function (event) {
      event.preventDefault();
      sessionStorage.setItem(stored, input.value.trim());
      show(input.value.trim());
    });
    document.getElementById("forget").addEventListener("click", function () {
      sessionStorage.removeItem(stored);
      location.reload();
    });
    const key = sessionStorage.getItem(stored);
    if (key) { input.value = key; show(key); }
  })();
  </script>
</body>
</html>
"""


@cache
def swagger_ui_dir() -> Path | None:
    """The folder of Swagger UI's files shipped by the ``swagger-ui-bundle-v2`` wheel, if it is installed."""
    try:
        bundle = importlib.import_module("swagger_ui_bundle")
    except ImportError:
        return None
    folder = Path(str(getattr(bundle, "swagger_ui_path", "")))
    # The older swagger-ui-bundle wheel installs the same module with Swagger UI 4, which cannot show 3.1.
    version = re.fullmatch(r"swagger-ui-([0-9]+)\..*", folder.name)
    if version is None or int(version.group(1)) < 5 or not (folder / "swagger-ui-bundle.js").is_file():
        return None
    return folder


def _script_literal(text: str) -> str:
    """A JavaScript string literal that is also safe inside a <script> element."""
    return json.dumps(text).replace("<", "\\u003c")


async def docs_endpoint(request: HttpRequest) -> HttpResponse:
    root = request.root_path.rstrip("/")
    assets = f"{root}{STATIC_PATH}" if swagger_ui_dir() is not None else CDN
    page = PAGE.replace("__ASSETS__", assets).replace("__SPEC_URL__", _script_literal(f"{root}/"))
    headers = {"Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"}
    return HttpResponse(200, headers, page.encode(), "text/html; charset=utf-8")


@cache
def _asset(name: str) -> tuple[bytes, str, str] | None:
    """A file of Swagger UI's folder by its bare name (no path can be named): bytes, media type, ETag."""
    folder = swagger_ui_dir()
    if folder is None or name not in {entry.name for entry in folder.iterdir() if entry.is_file()}:
        return None
    data = (folder / name).read_bytes()
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if media_type.startswith("text/") or media_type in ("application/javascript", "application/json"):
        media_type += "; charset=utf-8"
    return data, media_type, f'"{hashlib.sha256(data).hexdigest()[:32]}"'


def static_file(request: HttpRequest, name: str) -> HttpResponse:
    """``GET /docs/static/<name>``: one of Swagger UI's files (404 for anything else, 405 for other methods)."""
    found = _asset(name)
    if found is None:
        raise InvalidPath("Invalid path specified in request URL")
    if request.method not in ("GET", "HEAD"):
        raise MethodNotAllowed(f"Unsupported HTTP method: {request.method}", allow=("GET", "HEAD"))
    data, media_type, etag = found
    headers = {"ETag": etag, "Cache-Control": "public, max-age=86400"}
    if request.headers.get("if-none-match") == etag:
        return HttpResponse(304, headers)
    return HttpResponse(200, headers, data, media_type)
