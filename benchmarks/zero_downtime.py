"""Zero-downtime deploys: HTTP requests at a fixed rate while an app is updated in place.

A gunicorn app (``gunicorn`` is installed by this script into a virtual environment of
its own, ``--venv``, with pip, if it is not there yet) answers ``GET /`` with its version.
Two runs, each of ``--updates`` (20) changes, with the same load loop on 127.0.0.1:

* socket: the process has ``"socket": {"port": P}`` and an HTTP health check; each change
  is an update in place (the ``update`` link) to a new archive (a new version), waited
  for until it ends;
* restart (the baseline): the same app binds ``127.0.0.1:$PORT`` itself, no socket; each
  change is a plain restart (the ``restart`` link), waited for until the app answers.

The load loop sends ``--rate`` requests a second (each on a new connection, HTTP/1.0,
bounded to ``--timeout`` s), from before the first change until the last one ended, and
at most ``--max-seconds``. Printed: requests sent, failed (refused, reset, timed out, 5xx,
other), and p50/p99 latency of the answered ones. Target: 0 failed during the updates.

Run: ``python benchmarks/zero_downtime.py [--updates 20] [--rate 100] [--venv DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path
from typing import Any

import benchlib as b

APP_PY = '''
import os
VERSION = "{version}"
def application(environ, start_response):
    body = ("%s %d\\n" % (VERSION, os.getpid())).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''
#: ``web`` takes the agent's socket (LISTEN_FDS); ``plain`` binds its PORT itself.
PROCFILE = (
    "web: {gunicorn} --workers 2 --graceful-timeout 10 --log-level warning app:application\n"
    "plain: {gunicorn} --workers 2 --graceful-timeout 10 --log-level warning "
    "--bind 127.0.0.1:$PORT app:application\n"
)
HEALTH = {"http": "/", "interval": 1, "timeout": 2, "failures": 10}


def gunicorn_in(folder: Path) -> Path:
    """The gunicorn of the virtual environment ``folder``, made and filled if needed."""
    program = folder / "bin" / "gunicorn"
    if not program.exists():
        print(f"   installing gunicorn into {folder} (pip)")
        venv.create(folder, with_pip=True)
        subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "install", "-q",
                        "gunicorn"], check=True, timeout=600)
    return program


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Load:
    """Requests at a fixed rate to 127.0.0.1:``port`` until :meth:`stop`."""

    def __init__(self, port: int, rate: float, timeout: float) -> None:
        self.port, self.rate, self.timeout = port, rate, timeout
        self.sent = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.latencies: list[float] = []
        self.versions: collections.Counter[str] = collections.Counter()
        self._stop = asyncio.Event()
        self._pending: set[asyncio.Task[None]] = set()

    async def run(self, max_seconds: float) -> None:
        period = 1 / self.rate
        start = time.monotonic()
        while not self._stop.is_set() and time.monotonic() - start < max_seconds:
            task = asyncio.get_running_loop().create_task(self._one())
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            self.sent += 1
            # the schedule, not the time the request took: a fixed rate
            next_at = start + self.sent * period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if self._pending:
            await asyncio.wait(self._pending)

    def stop(self) -> None:
        self._stop.set()

    async def _one(self) -> None:
        began = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
                answer = await reader.read()
                writer.close()
        except ConnectionRefusedError:
            self.failures["refused"] += 1
            return
        except ConnectionResetError:
            self.failures["reset"] += 1
            return
        except TimeoutError:
            self.failures["timed out"] += 1
            return
        except OSError as error:
            self.failures[type(error).__name__] += 1
            return
        status = answer.split(b" ", 2)[1:2]
        if not status:
            self.failures["empty answer"] += 1
        elif status[0].startswith(b"5"):
            self.failures["5xx"] += 1
        elif status[0] != b"200":
            self.failures[f"status {status[0].decode()}"] += 1
        else:
            self.latencies.append(time.perf_counter() - began)
            self.versions[answer.rsplit(b"\r\n\r\n", 1)[-1].split()[0].decode()] += 1

    def report(self, label: str) -> dict[str, Any]:
        failed = sum(self.failures.values())
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.failures.most_common()) or "none"
        print(f"   {label}: sent {self.sent}, failed {failed} ({kinds}); latency p50 "
              f"{1000 * b.median(self.latencies):.1f} ms, p99 "
              f"{1000 * b.percentile(self.latencies, 99):.1f} ms; answered by "
              f"{len(self.versions)} version(s)")
        return {"sent": self.sent, "failed": failed}


async def wait_answer(port: int, deadline: float) -> None:
    """Wait until 127.0.0.1:``port`` answers HTTP."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            if (await reader.read()).startswith(b"HTTP/1"):
                writer.close()
                return
            writer.close()
        except OSError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing answers on port {port} after {deadline:g} s")


async def post(api: b.Api, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with api.session.post(url, json=body) as response:
        document: dict[str, Any] = await response.json()
        if response.status >= 300:
            raise RuntimeError(f"POST {url}: {response.status} {document}")
        return document


async def create(api: b.Api, body: dict[str, Any]) -> dict[str, Any]:
    return await post(api, f"{api.base}/create-process", body)


async def updates(api: b.Api, slug: str, urls: list[str]) -> list[float]:
    """Update ``slug`` to each of ``urls`` in turn; how long each took."""
    took = []
    for url in urls:
        status = await api.status(slug)
        began = time.monotonic()
        await post(api, status["update"], {"source_url": url})
        while True:
            status = await api.status(slug)
            if status["pending_source"] is None:
                break
            await asyncio.sleep(0.05)
        if status["update_error"] or status["source"]["url"] != url:
            raise RuntimeError(f"the update to {url} failed: {status['update_error']}")
        took.append(time.monotonic() - began)
    return took


async def restarts(api: b.Api, slug: str, port: int, count: int) -> list[float]:
    """Restart ``slug`` ``count`` times, each until it answers again; how long each took."""
    took = []
    for _ in range(count):
        status = await api.status(slug)
        began = time.monotonic()
        await post(api, status["restart"], {})
        await api.wait_state(slug, ["running"])
        await wait_answer(port, 30)
        took.append(time.monotonic() - began)
    return took


async def measure(
    api: b.Api, port: int, args: argparse.Namespace, changes: Any, label: str
) -> dict[str, Any]:
    """Run the load loop on ``port`` while ``changes`` (a coroutine) runs, and a second
    more; print and return the figures."""
    load = Load(port, args.rate, args.timeout)
    loop = asyncio.get_running_loop().create_task(load.run(args.max_seconds))
    took = await changes
    await asyncio.sleep(1)
    load.stop()
    await loop
    print(f"   {len(took)} changes, each {b.median(took):.2f} s (median), "
          f"{max(took):.2f} s at most")
    return load.report(label)


async def run(args: argparse.Namespace, gunicorn: Path) -> dict[str, dict[str, Any]]:
    files = {f"v{i}.tar.gz": b.make_tar_gz({
        "Procfile": PROCFILE.format(gunicorn=gunicorn),
        "app.py": APP_PY.format(version=f"v{i}"),
    }) for i in range(args.updates + 1)}
    results: dict[str, dict[str, Any]] = {}
    async with b.bench_env() as (_tmp, _server, agent, api), b.ArchiveServer(files) as server:
        urls = [server.url(f"v{i}.tar.gz") for i in range(args.updates + 1)]
        port = free_port()
        await create(api, {"app": "bench", "node": "web.0", "process_type": "web",
                           "source_url": urls[0], "socket": {"port": port},
                           "health": HEALTH, "start_seconds": 0.5, "stop_timeout": 15})
        await api.wait_state("bench.web.0", ["running"], timeout=60)
        await wait_answer(port, 30)
        results["socket"] = await measure(api, port, args, updates(
            api, "bench.web.0", urls[1:]), "socket, update in place")

        plain_port = free_port()
        await create(api, {"app": "bench", "node": "plain.0", "process_type": "plain",
                           "source_url": urls[0], "env": {"PORT": str(plain_port)},
                           "stop_timeout": 15})
        await api.wait_state("bench.plain.0", ["running"], timeout=60)
        await wait_answer(plain_port, 30)
        results["restart"] = await measure(api, plain_port, args, restarts(
            api, "bench.plain.0", plain_port, args.updates), "no socket, plain restart")
        print(f"   agent pid {agent.pid}, CPU {agent.cpu():.2f} s")
    return results


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--rate", type=float, default=100, help="requests per second")
    parser.add_argument("--timeout", type=float, default=5, help="seconds per request")
    parser.add_argument("--max-seconds", type=float, default=300)
    parser.add_argument("--venv", type=Path, default=Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "smartmob-bench-gunicorn")
    args = parser.parse_args()
    b.header(f"zero-downtime deploys: {args.updates} updates under {args.rate:g} requests/s")
    gunicorn = await asyncio.to_thread(gunicorn_in, args.venv)
    results = await run(args, gunicorn)
    print("\n-- summary --")
    socket_failed = results["socket"]["failed"]
    print(f"   update in place with a socket: {socket_failed} failed of "
          f"{results['socket']['sent']} (target 0: {b.verdict(socket_failed == 0)}); "
          f"plain restart without a socket: {results['restart']['failed']} failed of "
          f"{results['restart']['sent']}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
