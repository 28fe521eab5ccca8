"""Sending alert notifications to webhooks: Slack-compatible, or JSON signed with HMAC-SHA256.

Notifications are queued and sent by background tasks (never on a request's path), each webhook with its own
timeout and retries with exponential backoff (a ``Retry-After`` of 429 or 503 is honoured, up to
:data:`MAX_BACKOFF_S`). An answer 2xx is a delivery; 408, 425, 429 and 5xx and network errors are retried;
any other answer is final. A webhook that could not be reached after its retries is logged once per alert
episode and counted (``gatehouse_alert_notifications_total{outcome="failed"}``); the store's lease brings the
notification back later (:mod:`gatehouse.observe.alert_state`).

The JSON body is signed like Stripe's webhooks: header ``Gatehouse-Signature: t=<unix seconds>,v1=<hex>``
where ``hex`` is HMAC-SHA256 with the webhook's secret over ``<t>.<body>``. ``Gatehouse-Event-Id`` (also the
body's ``id``) is the same for every attempt of one notification, so a receiver can drop repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import httpx
import orjson

from gatehouse import __version__
from gatehouse.background import stop_tasks
from gatehouse.config_alerts import WebhookConfig
from gatehouse.errors import DatabaseUnavailable, ProjectError
from gatehouse.observe.alert_state import AlertStore, Transition
from gatehouse.secrets import resolve_secret

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 60.0
QUEUE_SIZE = 1000
WORKERS = 4
RETRYABLE = frozenset({408, 425, 429})
SIGNATURE_HEADER = "Gatehouse-Signature"
EVENT_ID_HEADER = "Gatehouse-Event-Id"
Status = Literal["firing", "resolved", "test"]


@dataclass(frozen=True, slots=True)
class Notification:
    """One transition of one rule and subject, as every webhook is told it."""

    status: Status
    episode: str
    """Shared by the firing and the resolution of one alert."""
    rule: str
    kind: str
    severity: str
    subject: str
    labels: Mapping[str, str]
    value: float | None
    threshold: float | None
    text: str
    """One line saying what was measured, e.g. ``replica shop/r1 is 12.3 s behind (over 10 s)``."""
    summary: str
    started_at: datetime
    resolved_at: datetime | None
    project: str
    webhooks: tuple[str, ...]
    transition: Transition | None = field(default=None, compare=False)
    """The claimed row in the store (acknowledged per webhook there); None when nothing was recorded."""

    @property
    def id(self) -> str:
        return f"{self.episode}.{self.status}"


def _moment(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat(timespec="seconds").replace("+00:00", "Z")


def json_body(n: Notification) -> bytes:
    return orjson.dumps({
        "id": n.id, "type": "gatehouse.alert", "status": n.status, "episode": n.episode, "rule": n.rule,
        "kind": n.kind, "severity": n.severity, "subject": n.subject, "labels": dict(n.labels), "value": n.value,
        "threshold": n.threshold, "text": n.text, "summary": n.summary, "started_at": _moment(n.started_at),
        "resolved_at": _moment(n.resolved_at), "project": n.project,
    })


def _mrkdwn(text: str) -> str:
    """Slack's escaping: &, < and > only (they would start a link or an entity)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_HEADINGS = {"firing": "\U0001f534 Firing", "resolved": "\u2705 Resolved", "test": "\U0001f514 Test"}


def slack_body(n: Notification) -> bytes:
    """A Slack incoming-webhook message: ``text`` (the notification's fallback) and Block Kit ``blocks``."""
    heading = f"{_HEADINGS[n.status]}: {n.rule}"
    detail = n.text + (f"\n{n.summary}" if n.summary else "")
    context = f"project {n.project} \u00b7 {n.severity} \u00b7 since {_moment(n.started_at)}"
    if n.resolved_at is not None:
        context += f" \u00b7 resolved {_moment(n.resolved_at)}"
    return orjson.dumps({
        "text": f"{heading}: {n.text}",
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": heading[:150]}},
            {"type": "section", "text": {"type": "mrkdwn", "text": _mrkdwn(detail)[:3000]}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": _mrkdwn(f"{context} \u00b7 id {n.id}")}]},
        ],
    })


def sign(secret: bytes, body: bytes, at: int) -> str:
    """The ``Gatehouse-Signature`` value of ``body`` sent at unix time ``at``."""
    digest = hmac.new(secret, str(at).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={digest}"


class Webhook:
    """One configured webhook: its URL and secret read from the environment once, at start."""

    def __init__(self, name: str, config: WebhookConfig, client: httpx.AsyncClient) -> None:
        self.name, self.config, self._client = name, config, client
        url = resolve_secret(config.url, what=f"[alerts.webhooks.{name}] url")
        assert url is not None
        if not url.startswith(("https://", "http://")):
            raise ProjectError(f"[alerts.webhooks.{name}] url (from {config.url}) is not an http(s) URL",
                               hint="set the variable to the webhook's https://... address")
        self._url = url
        secret = resolve_secret(config.secret, what=f"[alerts.webhooks.{name}] secret")
        self._secret = secret.encode() if secret is not None else None

    def _request(self, n: Notification) -> tuple[bytes, dict[str, str]]:
        headers = {"Content-Type": "application/json", "User-Agent": f"gatehouse/{__version__}",
                   EVENT_ID_HEADER: n.id}
        if self.config.format == "slack":
            return slack_body(n), headers
        body = json_body(n)
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, body, int(time.time()))
        return body, headers

    async def attempt(self, n: Notification) -> tuple[bool, str, float | None]:
        """One POST: (delivered, what happened, how long the receiver asked us to wait, if it did)."""
        body, headers = self._request(n)
        try:
            answer = await self._client.post(self._url, content=body, headers=headers,
                                             timeout=self.config.timeout_s)
        except httpx.HTTPError as exc:
            return False, type(exc).__name__, None
        if 200 <= answer.status_code < 300:
            return True, f"HTTP {answer.status_code}", None
        wait = None
        if answer.status_code in (429, 503):
            with contextlib.suppress(ValueError):
                wait = float(answer.headers.get("Retry-After", ""))
        retry = answer.status_code in RETRYABLE or answer.status_code >= 500
        return False, f"HTTP {answer.status_code}" + ("" if retry else " (final)"), wait

    async def send(self, n: Notification, retries: int | None = None) -> tuple[bool, str, int]:
        """Deliver with retries: (delivered, the last outcome, attempts made)."""
        allowed = self.config.retries if retries is None else retries
        delay = self.config.backoff_s
        outcome = ""
        for number in range(1, allowed + 2):
            delivered, outcome, wait = await self.attempt(n)
            if delivered or outcome.endswith("(final)") or number > allowed:
                return delivered, outcome, number
            pause = min(wait if wait is not None else delay * (0.8 + 0.4 * random.random()), MAX_BACKOFF_S)
            await asyncio.sleep(pause)
            delay = min(delay * 2, MAX_BACKOFF_S)
        return False, outcome, allowed + 1


class Dispatcher:
    """The queue of notifications and the tasks that send them; counts what happened per webhook."""

    def __init__(self, webhooks: Mapping[str, Webhook], store: AlertStore | None,
                 client: httpx.AsyncClient | None = None) -> None:
        self.webhooks = dict(webhooks)
        self._store = store
        self._client = client
        self._queue: asyncio.Queue[Notification] = asyncio.Queue(QUEUE_SIZE)
        self._workers: list[asyncio.Task[None]] = []
        self.counts: Counter[tuple[str, str]] = Counter()
        """(webhook, outcome) → notifications: sent, failed (retries ran out), dropped (queue full)."""
        self._failed: set[tuple[str, str]] = set()
        """(episode, webhook) already logged as failing: once per episode."""

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._work(), name=f"gatehouse-alerts-send-{i}") for i in range(WORKERS)]

    def submit(self, n: Notification) -> None:
        """Queue ``n`` (never waits); if the queue is full it is dropped here and counted, and comes back once
        its lease in the store runs out."""
        try:
            self._queue.put_nowait(n)
        except asyncio.QueueFull:
            for name in n.webhooks:
                self.counts[(name, "dropped")] += 1
            log.warning("alerts: the notification queue is full; %s of rule %r is sent later", n.status, n.rule)

    async def drain(self, timeout_s: float) -> None:
        """Wait until everything queued has been tried (for tests and a clean stop)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._queue.join()

    async def stop(self, grace_s: float = 2.0) -> None:
        await self.drain(grace_s)
        await stop_tasks(self._workers)
        self._workers = []
        if self._client is not None:
            await self._client.aclose()

    async def _work(self) -> None:
        while True:
            n = await self._queue.get()
            try:
                await self.deliver(n)
            except Exception as exc:  # a bug must not end the worker
                log.error("alerts: sending %s of rule %r failed (%s)", n.status, n.rule, type(exc).__name__)
            finally:
                self._queue.task_done()

    async def deliver(self, n: Notification) -> dict[str, bool]:
        done = set(n.transition.delivered) if n.transition is not None else set()
        names = [name for name in n.webhooks if name in self.webhooks and name not in done]
        results = await asyncio.gather(*(self._deliver_one(n, name) for name in names))
        return dict(zip(names, results, strict=True))

    async def _deliver_one(self, n: Notification, name: str) -> bool:
        delivered, outcome, attempts = await self.webhooks[name].send(n)
        key = (n.episode, name)
        if not delivered:
            self.counts[(name, "failed")] += 1
            if key not in self._failed:
                self._failed.add(key)
                log.warning("alerts: webhook %s did not take %s of rule %r (%s) after %d attempt(s); it is tried "
                            "again later", name, n.status, n.rule, outcome, attempts)
            return False
        self.counts[(name, "sent")] += 1
        if key in self._failed:
            self._failed.discard(key)
            log.info("alerts: webhook %s took %s of rule %r after all", name, n.status, n.rule)
        if n.transition is not None and self._store is not None:
            # If this cannot be recorded, the lease runs out and it is sent again: the receiver drops it by its id.
            with contextlib.suppress(DatabaseUnavailable):
                await self._store.delivered(n.transition, name, n.webhooks)
        return True


def trial_notification(project: str, webhook: str, at: datetime) -> Notification:
    """What ``gatehouse alerts test`` sends."""
    import uuid

    return Notification(status="test", episode=uuid.uuid4().hex, rule="test", kind="test", severity="info",
                        subject=webhook, labels={}, value=None, threshold=None,
                        text=f"a test notification from gatehouse (project {project}) to webhook {webhook}",
                        summary="", started_at=at, resolved_at=None, project=project, webhooks=(webhook,))


def payload_of(n: Notification, fmt: str) -> dict[str, Any]:
    """The body a webhook of format ``fmt`` gets, as data (for docs and tests)."""
    result: dict[str, Any] = orjson.loads(slack_body(n) if fmt == "slack" else json_body(n))
    return result
