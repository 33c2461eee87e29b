"""Webhooks: batch events from the outbox to their receiver, signed, with retries (tokabatch serve).

Owns delivery. storage/outbox.py holds the events (written with the batch's terminal status, so a
restart loses none); the sender takes the due ones (a compare-and-set that is also a lease, so
servers sharing a database never send one attempt twice), POSTs each event's JSON to the batch's
`metadata.webhook_url`, else the server's `--webhook-url`, signed the Standard Webhooks way
(`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">` keyed with the secret's bytes after `whsec_`), which the `standardwebhooks`
package and the openai client's `webhooks.unwrap` verify. A 2xx delivers it; anything else is
tried again after `retry_s`, 4x longer each time up to 6 h, and after `max_attempts` it is abandoned
with its last error. Delivery is at least once: a crash between the receiver's 2xx and the mark
sends the same `webhook-id` again, which receivers dedupe. Uses aiohttp's client; must not import
torch or service/http (http/batches.py imports check_webhook_metadata from here).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
from typing import Any, Callable
from urllib.parse import urlsplit

import aiohttp

from tokabatch.config import WebhookConfig
from tokabatch.errors import InvalidRequest
from tokabatch.service.storage import outbox, repo
from tokabatch.service.storage.db import Database
from tokabatch.service.storage.models import WebhookEvent

log = logging.getLogger(__name__)
MAX_RETRY_AFTER_S = 6 * 3600.0
LEASE_MARGIN_S = 5.0                 # an attempt holds its event for timeout_s plus this
CLAIM_LIMIT = 16                     # events attempted together in one round
METADATA_KEY = "webhook_url"


def signature_headers(secret: str, event_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt (`timestamp`: the attempt's Unix seconds)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{event_id}.{timestamp}.".encode() + body
    digest = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return {"webhook-id": event_id, "webhook-timestamp": str(timestamp), "webhook-signature": f"v1,{digest}"}


def check_webhook_metadata(metadata: dict[str, str] | None, *, secret_configured: bool,
                           allowed_hosts: tuple[str, ...] = ()) -> None:
    """POST /v1/batches: a `metadata.webhook_url` must be an absolute http(s) URL, the server must be
    able to sign what it sends there, and with `allowed_hosts` (serve --webhook-allow-host) its host
    must be one of them: callers cannot make the server post to its own network's other hosts."""
    url = (metadata or {}).get(METADATA_KEY)
    if url is None:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidRequest(f"Invalid 'metadata.{METADATA_KEY}': expected an absolute http(s) URL, got {url!r}.",
                             param=f"metadata.{METADATA_KEY}", code="invalid_value")
    if not secret_configured:
        raise InvalidRequest(f"Invalid 'metadata.{METADATA_KEY}': this server signs no webhooks (it was started "
                             "without --webhook-secret).", param=f"metadata.{METADATA_KEY}", code="invalid_value")
    host = (parts.hostname or "").lower()
    if allowed_hosts and not any(host == h.lstrip(".") or (h.startswith(".") and host.endswith(h))
                                 for h in (a.lower() for a in allowed_hosts)):
        raise InvalidRequest(f"Invalid 'metadata.{METADATA_KEY}': this server sends webhooks only to "
                             f"{', '.join(allowed_hosts)}, not to {host!r}.", param=f"metadata.{METADATA_KEY}",
                             code="invalid_value")


class WebhookSender:
    """Delivers due events until stopped; one per server process (several may share a database).

    `clock` schedules attempts (the service's clock, as the outbox's times are); the signature's
    timestamp is always the wall clock, since the receiver checks it against its own."""

    def __init__(self, config: WebhookConfig, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.config, self.db, self.clock = config, db, clock
        self.lease_s = config.timeout_s + LEASE_MARGIN_S
        self._stopping = asyncio.Event()

    def retry_after_s(self, attempts: int) -> float:
        return min(MAX_RETRY_AFTER_S, self.config.retry_s * 4 ** max(0, attempts - 1))

    async def run_forever(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not self._stopping.is_set():
                try:
                    if await self.deliver_due(session) == CLAIM_LIMIT:
                        continue               # a backlog: the next round at once
                except Exception:              # the database is away, ...: keep the sender alive
                    log.exception("webhook delivery round failed; trying again")
                try:
                    await asyncio.wait_for(self._stopping.wait(), self.config.poll_interval_s)
                except asyncio.TimeoutError:
                    pass

    def stop(self) -> None:
        self._stopping.set()

    async def deliver_due(self, session: aiohttp.ClientSession) -> int:
        """One round: every due event gets one attempt (concurrently); returns how many were tried."""
        events = await outbox.claim_due(self.db, self.clock(), self.lease_s, limit=CLAIM_LIMIT)
        await asyncio.gather(*(self._attempt_logged(session, event) for event in events))
        return len(events)

    async def _attempt_logged(self, session: aiohttp.ClientSession, event: WebhookEvent) -> None:
        """One event's failure (its batch unreadable, the database gone mid-attempt) is logged and
        stays its own: the event is due again when its lease lapses."""
        try:
            await self._attempt(session, event)
        except Exception:
            log.exception("webhook %s for batch %s: attempt %d failed unexpectedly; due again in %.0f s",
                          event.type, event.batch_id, event.attempts, self.lease_s, extra=_extra(event))

    async def _attempt(self, session: aiohttp.ClientSession, event: WebhookEvent) -> None:
        url = await self._url(event)
        if url is None or self.config.secret is None:
            why = "no webhook URL (none in the batch's metadata, no --webhook-url)" if url is None else \
                "no --webhook-secret to sign it with"
            await outbox.abandon(self.db, event.id, int(self.clock()), why, attempt=event.attempts)
            log.debug("webhook %s for batch %s not sent: %s", event.type, event.batch_id, why, extra=_extra(event))
            return
        error = await self._post(session, url, event)
        if error is None:
            await outbox.mark_delivered(self.db, event.id, int(self.clock()))
            log.info("webhook %s for batch %s delivered", event.type, event.batch_id, extra=_extra(event))
        elif event.attempts >= self.config.max_attempts:
            await outbox.abandon(self.db, event.id, int(self.clock()), error, attempt=event.attempts)
            log.warning("webhook %s for batch %s abandoned after %d attempts: %s", event.type, event.batch_id,
                        event.attempts, error, extra=_extra(event))
        else:
            delay_s = self.retry_after_s(event.attempts)
            await outbox.retry_later(self.db, event.id, self.clock() + delay_s, error, attempt=event.attempts)
            log.info("webhook %s for batch %s failed (%s); next attempt in %.0f s", event.type, event.batch_id,
                     error, delay_s, extra=_extra(event))

    async def _post(self, session: aiohttp.ClientSession, url: str, event: WebhookEvent) -> str | None:
        """POST the payload's bytes as stored; None for a 2xx, else what went wrong. A redirect is
        not followed (it is an answer other than 2xx)."""
        body = event.payload.encode()
        headers = {**signature_headers(self.config.secret or "", event.id, int(time.time()), body),
                   "content-type": "application/json"}
        try:
            async with session.post(url, data=body, headers=headers, allow_redirects=False) as response:
                return None if 200 <= response.status < 300 else f"HTTP {response.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    async def _url(self, event: WebhookEvent) -> str | None:
        batch = await repo.get_batch(self.db, event.batch_id, owner=None)
        own = (batch.metadata_ or {}).get(METADATA_KEY) if batch is not None else None
        return own or self.config.url


def _extra(event: WebhookEvent) -> dict[str, Any]:
    return {"event_id": event.id, "batch_id": event.batch_id, "attempt": event.attempts}


__all__ = ["WebhookSender", "check_webhook_metadata", "signature_headers"]
