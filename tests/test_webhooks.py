"""Webhooks: real POSTs to a real receiver on 127.0.0.1, in order, signed, retried."""

from __future__ import annotations

import asyncio
import doctest
import hashlib
import hmac
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from smartmob_agent.events import webhooks
from smartmob_agent.events.bus import ProcessEvent, make_event
from smartmob_agent.events.webhooks import Webhooks, shown, sign
from smartmob_agent.model import Backoff

#: Short delays between attempts, so retries cost the suite little time.
FAST_RETRY = Backoff(0.01, 0.02)


def event(n: int) -> ProcessEvent:
    """A ``process:exit`` event numbered ``n`` (in ``pid``)."""
    return make_event("process:exit", slug="myapp.web.0", app="myapp", node="web.0",
                      process_type="web", pid=n, state="backoff", code=1, signal=None,
                      ran_for=0.5, clock=lambda: 1796148000.123)


@dataclass
class Hit:
    """One request the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A webhook endpoint on 127.0.0.1.

    ``/ok`` accepts; ``/flaky`` answers 500 twice then accepts; ``/fail`` always answers
    500; ``/refuse`` always answers 401; ``/busy`` answers 429 once then accepts;
    ``/hang`` never answers.
    """

    server: TestServer
    hits: list[Hit] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        """The absolute URL of ``path``."""
        return str(self.server.make_url(path))

    def at(self, path: str) -> list[Hit]:
        """The requests received at ``path``, in order."""
        return [hit for hit in self.hits if hit.path == path]

    async def wait_for(self, path: str, count: int, timeout: float = 10.0) -> list[Hit]:
        """Wait until ``path`` has received ``count`` requests; return them."""
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(lambda: len(self.at(path)) >= count)
        return self.at(path)


@pytest.fixture
async def receiver(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> AsyncIterator[Receiver]:
    """A running receiver; its hanging requests are let go at the end."""
    state: dict[str, Receiver] = {}

    async def receive(request: web.Request) -> web.Response:
        served = state["receiver"]
        hit = Hit(request.path, dict(request.headers), await request.read())
        async with served.changed:
            served.hits.append(hit)
            served.changed.notify_all()
        if request.path == "/hang":
            await served.release.wait()
        if request.path == "/refuse":
            return web.Response(status=401, text="bad signature")
        if request.path == "/busy" and len(served.at("/busy")) <= 1:
            return web.Response(status=429, text="slow down")
        if request.path == "/fail" or (
            request.path == "/flaky" and len(served.at("/flaky")) <= 2
        ):
            return web.Response(status=500, text="not now")
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{name}", receive)
    state["receiver"] = Receiver(await aiohttp_server(app, host="127.0.0.1"))
    yield state["receiver"]
    state["receiver"].release.set()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client session for the webhooks."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def dead_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (a port bound, then let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/dead"


async def test_events_arrive_in_order_with_a_correct_signature(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """Every event reaches the endpoint as a JSON POST, in order, with its kind, a distinct
    delivery id, and an HMAC-SHA256 of the exact body under the secret."""
    secret = b"s3cret"
    hooks = Webhooks(session, [receiver.url("/ok")], secret)
    events = [event(n) for n in range(30)]
    for each in events:
        hooks.submit(each)
    hits = await receiver.wait_for("/ok", 30)
    assert [json.loads(hit.body) for hit in hits] == events
    for hit in hits:
        expected = hmac.new(secret, hit.body, hashlib.sha256).hexdigest()
        assert hit.headers["X-Smartmob-Signature"] == f"sha256={expected}"
        assert hit.headers["X-Smartmob-Event"] == "process:exit"
        assert hit.headers["Content-Type"] == "application/json"
        assert hit.headers["User-Agent"].startswith("smartmob-agent/")
    assert len({hit.headers["X-Smartmob-Delivery"] for hit in hits}) == 30
    await hooks.close(grace=10)
    assert hooks.stats() == {
        receiver.url("/ok"): {"delivered": 30, "failed": 0, "dropped": 0, "queued": 0},
    }


def test_sign_follows_githubs_convention() -> None:
    """A signature is ``sha256=`` and the hex HMAC-SHA256 of the body (RFC 4231 case 2)."""
    assert sign(b"Jefe", b"what do ya want for nothing?") == (
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )


async def test_no_signature_without_a_secret(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """Without a secret, requests carry no signature header."""
    hooks = Webhooks(session, [receiver.url("/ok")])
    hooks.submit(event(1))
    [hit] = await receiver.wait_for("/ok", 1)
    assert "X-Smartmob-Signature" not in hit.headers
    assert json.loads(hit.body) == event(1)
    await hooks.close()


async def test_only_global_urls_get_signed_bodies(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """A process's notify URL comes from whoever created it: it gets no signature, which it
    could replay to the operator's receivers; a global URL given as notify too does."""
    hooks = Webhooks(session, [receiver.url("/ok")], b"s3cret")
    hooks.submit(event(1), [receiver.url("/theirs"), receiver.url("/ok")])
    [ours] = await receiver.wait_for("/ok", 1)
    [theirs] = await receiver.wait_for("/theirs", 1)
    assert ours.headers["X-Smartmob-Signature"].startswith("sha256=")
    assert "X-Smartmob-Signature" not in theirs.headers
    assert theirs.body == ours.body
    await hooks.close()


async def test_a_process_urls_join_the_global_ones_without_duplicates(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """An event goes to every global URL and to the process's own, once to a URL given in
    both."""
    hooks = Webhooks(session, [receiver.url("/ok")])
    hooks.submit(event(1), [receiver.url("/own"), receiver.url("/ok"), receiver.url("/own")])
    hooks.submit(event(2))
    await hooks.close(grace=10)
    assert [json.loads(hit.body)["pid"] for hit in receiver.at("/ok")] == [1, 2]
    assert [json.loads(hit.body)["pid"] for hit in receiver.at("/own")] == [1]
    assert hooks.stats()[receiver.url("/own")]["delivered"] == 1


async def test_an_event_refused_twice_is_delivered_on_the_third_attempt(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """An endpoint that answers 500 twice then 2xx gets the event on the third attempt, with
    the same body and delivery id each time, and the next event after it."""
    hooks = Webhooks(session, [receiver.url("/flaky")], b"k", retry=FAST_RETRY)
    hooks.submit(event(1))
    hooks.submit(event(2))
    await hooks.close(grace=10)
    hits = receiver.at("/flaky")
    assert [json.loads(hit.body)["pid"] for hit in hits] == [1, 1, 1, 2]
    assert len({hit.headers["X-Smartmob-Delivery"] for hit in hits[:3]}) == 1
    assert len({hit.body for hit in hits[:3]}) == 1
    assert hooks.stats()[receiver.url("/flaky")] == {
        "delivered": 2, "failed": 0, "dropped": 0, "queued": 0,
    }


async def test_retries_back_off_exponentially_with_jitter_and_then_give_up(
    receiver: Receiver, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Delays double from the first retry delay up to the longest, each plus up to 25%
    jitter; after max_attempts the event is given up, counted and logged."""
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)

    hooks = Webhooks(session, [receiver.url("/fail")], retry=Backoff(0.5, 2.0), max_attempts=6,
                     sleep=sleep, random=lambda: 1.0)
    with caplog.at_level(logging.WARNING, logger="smartmob_agent.webhooks"):
        hooks.submit(event(1))
        await hooks.close(grace=10)
    assert delays == [0.625, 1.25, 2.5, 2.5, 2.5]
    assert len(receiver.at("/fail")) == 6
    assert hooks.stats()[receiver.url("/fail")]["failed"] == 1
    assert "gave up on a process:exit event after 6 attempt(s)" in caplog.text
    assert "500" in caplog.text


@pytest.mark.parametrize(("retry", "jitter", "delay"), [
    (1, 0.0, 0.5), (2, 0.0, 1.0), (3, 0.0, 2.0), (7, 0.0, 30.0), (60, 0.0, 30.0),
    (1, 0.5, 0.5625), (7, 1.0, 37.5),
])
async def test_delay_table(
    session: aiohttp.ClientSession, retry: int, jitter: float, delay: float
) -> None:
    """The default delays start at 0.5 s, double up to 30 s, plus the jitter fraction."""
    hooks = Webhooks(session, random=lambda: jitter)
    assert hooks.delay(retry) == pytest.approx(delay)


async def test_a_dead_endpoint_neither_delays_others_nor_grows(
    receiver: Receiver, session: aiohttp.ClientSession, dead_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While a dead endpoint waits to retry its first event, a live one gets every event;
    the dead one's queue stays at max_queue, drops are counted and warned of once."""
    hooks = Webhooks(session, [dead_url, receiver.url("/ok")], max_queue=3,
                     retry=Backoff(60.0, 60.0))
    with caplog.at_level(logging.WARNING, logger="smartmob_agent.webhooks"):
        for n in range(10):
            hooks.submit(event(n))
            await receiver.wait_for("/ok", n + 1)  # one at a time: the live queue never fills
    assert [json.loads(hit.body)["pid"] for hit in receiver.at("/ok")] == list(range(10))
    dead = hooks.stats()[dead_url]
    # the first event is in flight (waiting 60 s to retry); of the 9 after it, 3 wait
    assert dead == {"delivered": 0, "failed": 0, "dropped": 6, "queued": 3}
    assert caplog.text.count("does not keep up") == 1
    started = time.monotonic()
    await hooks.close()
    assert time.monotonic() - started < 1


async def test_a_hanging_endpoint_times_out(
    receiver: Receiver, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """An endpoint that never answers fails each attempt at the timeout; the event is then
    given up and logged."""
    hooks = Webhooks(session, [receiver.url("/hang")], timeout=0.2, max_attempts=2,
                     retry=FAST_RETRY)
    with caplog.at_level(logging.WARNING, logger="smartmob_agent.webhooks"):
        hooks.submit(event(1))
        await hooks.close(grace=10)
    assert len(receiver.at("/hang")) == 2
    assert hooks.stats()[receiver.url("/hang")]["failed"] == 1
    assert "did not answer within 0.2 s" in caplog.text


async def test_close_returns_promptly_with_a_hanging_endpoint(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """close() returns within a second while a request hangs, and later events are ignored."""
    hooks = Webhooks(session, [receiver.url("/hang")], timeout=60)
    hooks.submit(event(1))
    hooks.submit(event(2))
    await receiver.wait_for("/hang", 1)
    started = time.monotonic()
    await hooks.close()
    assert time.monotonic() - started < 1
    hooks.submit(event(3))
    assert hooks.stats()[receiver.url("/hang")]["queued"] == 1


async def test_an_unusable_url_is_given_up_at_once(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """An event for a URL that is not one fails without any retry, and is logged."""
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)

    hooks = Webhooks(session, sleep=sleep)
    with caplog.at_level(logging.WARNING, logger="smartmob_agent.webhooks"):
        hooks.submit(event(1), ["not a url"])
        await hooks.close(grace=10)
    assert delays == []
    assert hooks.stats()["not a url"]["failed"] == 1
    assert "not a usable URL" in caplog.text


async def test_an_event_that_is_not_json_is_logged_not_sent(
    receiver: Receiver, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """submit() logs an event it cannot encode, does not raise, and sends the next one."""
    hooks = Webhooks(session, [receiver.url("/ok")])
    with caplog.at_level(logging.ERROR, logger="smartmob_agent.webhooks"):
        # a publisher's bug: a field that JSON cannot hold
        hooks.submit(make_event("process:state", slug="myapp.web.0", app="myapp",
                                node="web.0", process_type="web", pid=1, state="running",
                                previous=object()))
    hooks.submit(event(1))
    await hooks.close(grace=10)
    assert [json.loads(hit.body) for hit in receiver.at("/ok")] == [event(1)]
    assert "not JSON" in caplog.text


async def test_a_refusal_is_not_retried_but_too_many_requests_is(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    """A 4xx answer (a wrong secret, say) gives the event up at once; 429 (and 408) mean
    "later", so the event is sent again."""
    hooks = Webhooks(session, [receiver.url("/refuse"), receiver.url("/busy")],
                     retry=FAST_RETRY)
    hooks.submit(event(1))
    await hooks.close(grace=10)
    assert len(receiver.at("/refuse")) == 1
    assert hooks.stats()[receiver.url("/refuse")]["failed"] == 1
    assert len(receiver.at("/busy")) == 2
    assert hooks.stats()[receiver.url("/busy")]["delivered"] == 1


def test_logged_urls_hide_credentials_query_and_path() -> None:
    """Webhook URLs in logs lose user, password, query and path, where tokens live; a
    short digest tells two webhooks of one host apart."""
    one = shown("https://bot:s3cret@hooks.example/x?token=abc#f")
    assert one.startswith("https://hooks.example/… (#")
    for secret in ("bot", "s3cret", "token", "abc", "/x"):
        assert secret not in one
    other = shown("https://hooks.example/services/T0/B0/s3cret")
    assert other.startswith("https://hooks.example/… (#")
    assert other != one
    assert "s3cret" not in other
    assert shown("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"
    assert doctest.testmod(webhooks).failed == 0
