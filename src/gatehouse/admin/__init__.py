"""The web console on the admin port (``/console``): sign-in, apps and their keys, the audit, an overview.

Server-rendered pages (Jinja2 templates bundled in this package) with htmx, vendored under ``static/vendor``,
for the numbers that refresh; no inline script, so the Content-Security-Policy allows scripts from the console
itself only. Nothing here imports the data port's request path: the console calls :mod:`gatehouse.operations`
(async, its own owner connections) and reads the metrics registry.
"""
