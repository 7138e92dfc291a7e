"""Webhooks: each event POSTed as JSON to every URL that wants it, in order, with retries.

Each URL has its own bounded queue and its own delivery task, so an endpoint that is down
or hangs costs at most ``max_queue`` events of memory and delays no other URL, and
:meth:`Webhooks.submit` never waits at all. An event is tried up to ``max_attempts``
times, with exponential backoff and jitter between attempts, before it is given up; the
next event for that URL waits for it, so each endpoint receives its events in order.

The request follows GitHub's conventions: the event as the JSON body, its kind in
``X-Smartmob-Event``, an id in ``X-Smartmob-Delivery`` (the same on every attempt, so a
receiver can drop a duplicate), and, when a secret is set, ``X-Smartmob-Signature:
sha256=<hex>``, the HMAC-SHA256 of the exact body bytes under the secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random as _random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import aiohttp
from yarl import URL

from smartmob_agent import __version__
from smartmob_agent.events.bus import EventKind, ProcessEvent
from smartmob_agent.model import Backoff

log = logging.getLogger("smartmob_agent.webhooks")  # stable name: internals.rst

#: Shortest time between two warnings that one URL's queue overflows.
WARN_INTERVAL = 60.0
#: The largest random extra added to each backoff delay, as a fraction of it.
JITTER = 0.25

USER_AGENT = f"smartmob-agent/{__version__}"


#: Client errors worth retrying: the receiver was busy, not refusing the event.
RETRIED_CLIENT_ERRORS = frozenset({408, 429})


def shown(url: str) -> str:
    """``url`` as logs show it: its scheme, host and port only, since tokens live in the
    user, password, query and often the path (``/services/T/B/<secret>``); a path is
    replaced by ``…`` and a short digest of the whole URL tells webhooks apart.

    >>> from smartmob_agent.events.webhooks import shown
    >>> shown("https://hooks.example/services/T0/B0/s3cret")
    'https://hooks.example/… (#980ee8)'
    """
    try:
        parsed = URL(url)
        origin = str(parsed.origin())
    except (ValueError, TypeError):
        return "(an unusable URL)"
    if parsed.path in ("", "/") and not parsed.query_string:
        return origin
    tag = hashlib.sha256(url.encode()).hexdigest()[:6]
    return f"{origin}/… (#{tag})"


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-Smartmob-Signature`` value of ``body``: ``sha256=`` and the hex HMAC."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class _Delivery(NamedTuple):
    kind: EventKind
    body: bytes
    delivery_id: str


@dataclass(eq=False)
class _Target:
    """One URL: its queue, its counters, and its delivery task while it has work."""

    url: str
    pending: deque[_Delivery] = field(default_factory=deque)
    delivered: int = 0
    failed: int = 0
    dropped: int = 0
    task: asyncio.Task[None] | None = None
    last_warning: float = float("-inf")


class Webhooks:
    """Delivers events to webhook URLs in the background.

    Args:
        session: the HTTP client session to post with (not closed by :meth:`close`).
        urls: URLs that receive every event.
        secret: key of the HMAC signature; without it, requests are not signed.
        max_queue: events waiting per URL before the oldest is dropped.
        retry: the delays between two attempts, in seconds: from 0.5 s, doubling, up to
            30 s by default; each is lengthened by up to :data:`JITTER` of itself.
        max_attempts: attempts per event before it is given up.
        timeout: seconds one attempt may take, from connecting to the response status.
        sleep: waits between attempts (a seam for tests).
        random: a number in [0, 1) for the jitter (a seam for tests).
        clock: a monotonic clock, to space out the overflow warnings.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        urls: Sequence[str] = (),
        secret: bytes | None = None,
        *,
        max_queue: int = 1000,
        retry: Backoff = Backoff(initial=0.5, maximum=30.0),  # noqa: B008 (frozen)
        max_attempts: int = 6,
        timeout: float = 10.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        random: Callable[[], float] = _random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_queue < 1 or max_attempts < 1:
            raise ValueError("max_queue and max_attempts must be at least 1")
        self._session = session
        self._urls = tuple(dict.fromkeys(urls))
        self._secret = secret
        self._max_queue = max_queue
        self._retry = retry
        self._max_attempts = max_attempts
        self._timeout = timeout
        self._sleep = sleep
        self._random = random
        self._clock = clock
        self._targets = {url: _Target(url) for url in self._urls}
        self._closed = False

    def submit(self, event: ProcessEvent, extra_urls: Iterable[str] = ()) -> None:
        """Queue ``event`` for every global URL and for ``extra_urls``; never waits.

        A URL given twice (say, global and a process's own) receives the event once.
        """
        if self._closed:
            return
        urls = dict.fromkeys([*self._urls, *extra_urls])
        if not urls:
            return
        try:
            body = json.dumps(event, separators=(",", ":")).encode()
        except (TypeError, ValueError):
            log.exception("webhooks: the %s event is not JSON; not sent", event["event"])
            return
        delivery = _Delivery(event["event"], body, uuid.uuid4().hex)
        for url in urls:
            self._enqueue(url, delivery)

    def _enqueue(self, url: str, delivery: _Delivery) -> None:
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = _Target(url)
        if len(target.pending) >= self._max_queue:
            target.pending.popleft()
            target.dropped += 1
            now = self._clock()
            if now - target.last_warning >= WARN_INTERVAL:
                target.last_warning = now
                log.warning(
                    "webhook %s: does not keep up; %d event(s) dropped so far (it keeps the "
                    "latest %d)", shown(url), target.dropped, self._max_queue,
                )
        target.pending.append(delivery)
        if target.task is None:
            # the task lives while the URL has work, so an idle URL costs no task
            target.task = asyncio.get_running_loop().create_task(
                self._run(target), name=f"webhook {shown(url)}"
            )

    async def _run(self, target: _Target) -> None:
        try:
            while target.pending:
                delivery = target.pending.popleft()
                try:
                    delivered = await self._deliver(target.url, delivery)
                except Exception:  # a bug must not silence the URL for good
                    log.exception("webhook %s: failed to send a %s event", shown(target.url),
                                  delivery.kind)
                    delivered = False
                if delivered:
                    target.delivered += 1
                else:
                    target.failed += 1
        finally:
            # with no await between the empty check and here, submit() cannot slip an
            # event in unseen: it finds task None and starts a new one
            target.task = None

    async def _deliver(self, url: str, delivery: _Delivery) -> bool:
        """Try to deliver one event until it succeeds or the attempts run out."""
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Smartmob-Event": delivery.kind,
            "X-Smartmob-Delivery": delivery.delivery_id,
        }
        # only the operator's own URLs get signed bodies: a notify URL comes from whoever
        # may create a process, who could replay a signed body to the operator's receiver
        if self._secret is not None and url in self._urls:
            headers["X-Smartmob-Signature"] = sign(self._secret, delivery.body)
        problem = ""
        for attempt in range(1, self._max_attempts + 1):
            if attempt > 1:
                await self._sleep(self.delay(attempt - 1))
            try:
                # redirects are not followed: they would turn the POST into a GET
                async with asyncio.timeout(self._timeout), self._session.post(
                    url, data=delivery.body, headers=headers, allow_redirects=False
                ) as response:
                    if 200 <= response.status < 300:
                        return True
                    problem = f"it answered {response.status} {response.reason}"
                    if 400 <= response.status < 500 and (
                        response.status not in RETRIED_CLIENT_ERRORS
                    ):
                        break  # the receiver refuses this event (a wrong secret, say)
            except aiohttp.InvalidURL:
                log.warning("webhook %s: not a usable URL; the %s event is not sent",
                            shown(url), delivery.kind)
                return False
            except TimeoutError:
                problem = f"it did not answer within {self._timeout} s"
            except (aiohttp.ClientError, OSError) as error:
                problem = str(error) or type(error).__name__
        log.warning("webhook %s: gave up on a %s event after %d attempt(s); last, %s",
                    shown(url), delivery.kind, attempt, problem)
        return False

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the second attempt)."""
        base = self._retry.delay(retry)
        # jitter, so that endpoints coming back are not hit by every agent at once
        return base * (1 + JITTER * self._random())

    def stats(self) -> dict[str, dict[str, int]]:
        """Per URL: events ``delivered``, ``failed`` (given up), ``dropped``, ``queued``.

        ``queued`` counts the events waiting, not the one being delivered.
        """
        return {
            url: {"delivered": target.delivered, "failed": target.failed,
                  "dropped": target.dropped, "queued": len(target.pending)}
            for url, target in self._targets.items()
        }

    async def close(self, grace: float = 0.0) -> None:
        """Stop delivering: wait up to ``grace`` seconds for the queues to empty, then
        cancel the deliveries left (a hanging endpoint cannot hold this up).

        Events submitted afterwards are ignored.
        """
        self._closed = True
        tasks = [target.task for target in self._targets.values() if target.task is not None]
        if not tasks:
            return
        if grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
