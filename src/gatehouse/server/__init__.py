"""The wire: granian serving the data and admin ports (``serve``), the RSGI adapter and the checks hyper
leaves to us (``rsgi``), who the client is behind proxies (``proxies``), ``[server]`` as granian's settings
(``settings``). Nothing below ``gatehouse.app`` imports from here."""

from gatehouse.server.listen import bind_probe
from gatehouse.server.serve import serve

__all__ = ["bind_probe", "serve"]
