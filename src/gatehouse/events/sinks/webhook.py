"""Webhooks: a batch of events is one ``POST`` of ``{"events": [...]}`` (each element the JSON every sink sends,
in order), signed like gatehouse's alert webhooks (docs/alerts.md): ``Gatehouse-Signature: t=<unix>,v1=<hex>``,
HMAC-SHA256 with the sink's ``secret`` over ``<t>.<body>``.

An answer 2xx delivers the whole batch; anything else (or no answer within ``timeout_ms``) delivers none of it,
and the relay tries the same events again with a growing wait (a ``Retry-After`` of 429 or 503 is honoured),
never skipping them: a receiver that keeps refusing an event holds its sink back, which the relay's lag metric
shows. Each attempt is written to the delivery log (``gatehouse.event_deliveries``). A receiver drops repeats by
the events' ids: after a crash, events arrive again, possibly in batches cut differently.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import httpx

from gatehouse import __version__
from gatehouse.config_events import SinkConfig
from gatehouse.errors import ProjectError
from gatehouse.events.outbox import Event
from gatehouse.events.sinks import Published, body, describe
from gatehouse.observe.alert_sinks import SIGNATURE_HEADER, sign
from gatehouse.secrets import resolve_secret

EVENT_COUNT_HEADER = "Gatehouse-Events"


class WebhookSink:
    kind = "webhook"
    logs_deliveries = True

    def __init__(self, name: str, config: SinkConfig, url: str) -> None:
        if not url.startswith(("https://", "http://")):
            raise ProjectError(f"[sinks.{name}] url is not an http(s) URL",
                               hint="a webhook sink posts to https://...; set url (or the variable it names)")
        self.name, self.config, self._url = name, config, url
        secret = resolve_secret(config.secret, what=f"[sinks.{name}] secret")
        self._secret = secret.encode() if secret is not None else None
        self._client = httpx.AsyncClient(follow_redirects=False, timeout=config.timeout_ms / 1000,
                                         headers={"User-Agent": f"gatehouse/{__version__}"})

    def request(self, events: Sequence[Event], at: int) -> tuple[bytes, dict[str, str]]:
        """The body and headers of one POST of ``events`` at unix time ``at``."""
        content = b'{"events":[' + b",".join(body(e) for e in events) + b"]}"
        headers = {"Content-Type": "application/json", EVENT_COUNT_HEADER: str(len(events))}
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, content, at)
        return content, headers

    async def publish(self, events: Sequence[Event]) -> Published:
        content, headers = self.request(events, int(time.time()))
        try:
            answer = await self._client.post(self._url, content=content, headers=headers)
        except httpx.HTTPError as exc:
            return Published(0, describe(exc), status=describe(exc))
        status = f"HTTP {answer.status_code}"
        if 200 <= answer.status_code < 300:
            return Published(len(events), status=status)
        wait = None
        if answer.status_code in (429, 503):
            with contextlib.suppress(ValueError):
                wait = float(answer.headers.get("Retry-After", ""))
        return Published(0, status, retry_after_s=wait, status=status)

    async def close(self) -> None:
        await self._client.aclose()
