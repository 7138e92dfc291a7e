"""A live agent and an archive server for the doctests of the documentation.

The doctests of ``walkthrough.rst``, ``api.rst`` and ``lifecycle.rst`` talk to the real
``smartmob-agent`` command, started here in a subprocess on a free port of 127.0.0.1, to
a real HTTP server (also on 127.0.0.1, in a thread) that serves the source archives of
tiny apps, to a real webhook receiver, and to the agent's events WebSocket through a
real aiohttp client. Nothing is mocked: when the API changes, the doctests fail.

Each page calls :func:`start` in its ``testsetup`` and :func:`stop` in its
``testcleanup``. An ``atexit`` hook kills whatever a failed build left running.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import io
import json
import queue
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp

#: How long the agent may take to say it is listening, or to stop.
DEADLINE = 30.0

#: The Procfile of the demo app: its ``web`` process prints a line every 0.2 s.
PROCFILE = 'web: while true; do echo "hello from $GREETING"; sleep 0.2; done\n'
#: The Procfile of a broken app: its command does not exist.
BROKEN_PROCFILE = "web: no-such-command --port 8000\n"
#: The Procfile of the tools app, whose process types show the supervision options:
#: ``reload`` runs until stopped and says so when it gets SIGHUP; ``once`` does its job
#: and exits with code 3; ``echo`` answers each line of its standard input; ``env``
#: prints a few variables of its environment and exits 0.
TOOLS_PROCFILE = (
    "reload: trap 'echo \"reloading on SIGHUP\"' HUP; echo ready;"
    " while true; do sleep 0.1 & wait; done\n"
    'once: echo "did the job"; exit 3\n'
    'echo: while read line; do echo "you said: $line"; done\n'
    "env: env NAME=procfile echo \"port $PORT, name $NAME, greeting $GREETING,"
    ' colour $COLOUR"\n'
)
#: The ``.env`` file at the root of the tools app.
TOOLS_DOTENV = (
    "# defaults for every process type of the tools app\n"
    'export GREETING="hello from .env"\n'
    "NAME=dotenv\n"
    "COLOUR=green  # the request may say otherwise\n"
)

_READY = re.compile(r"listening on (http://127\.0\.0\.1:(\d+))/")


def make_tar_gz(files: Mapping[str, str]) -> bytes:
    """Return a ``.tar.gz`` archive of ``files`` (name -> text), built in memory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class ArchiveServer:
    """A real HTTP server on 127.0.0.1 serving archives from memory, in a thread.

    Attributes:
        requests: the headers of every request it received, in order.
        paths: the path of every request it received, in order.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[dict[str, str]] = []
        self.paths: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(dict(self.headers.items()))
                server.paths.append(self.path)
                data = server.files.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: the doctest output is what matters

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def add(self, name: str, data: bytes) -> str:
        """Serve ``data`` at ``/name``; return its absolute URL."""
        self.files[name] = data
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        """Stop serving and wait for the server thread to end."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(DEADLINE)


class Delivery:
    """One webhook request as the receiver got it: headers (a dict) and exact body bytes."""

    def __init__(self, headers: dict[str, str], body: bytes) -> None:
        self.headers = headers
        self.body = body

    @property
    def event(self) -> dict[str, Any]:
        """The body, decoded."""
        return json.loads(self.body)  # type: ignore[no-any-return]


class WebhookReceiver:
    """A real HTTP server on 127.0.0.1 that records every POST it gets and answers 204.

    Attributes:
        url: where to send webhooks.
    """

    def __init__(self) -> None:
        self.deliveries: queue.Queue[Delivery] = queue.Queue()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                receiver.deliveries.put(Delivery(dict(self.headers.items()), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/hooks/smartmob"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool]) -> Delivery:
        """Return the first delivery (from now on) whose event matches ``predicate``."""
        deadline = time.monotonic() + DEADLINE
        while True:
            delivery = self.deliveries.get(timeout=max(0.0, deadline - time.monotonic()))
            if predicate(delivery.event):
                return delivery

    def close(self) -> None:
        """Stop serving and wait for the server thread to end."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(DEADLINE)


class LiveSocket:
    """A WebSocket client run by aiohttp in a thread of its own, so that the doctests can
    read frames while they send requests with :func:`http`.

    It is connected when the constructor returns: every frame the agent sends from then on
    is received, in order. With ``json_frames``, each frame is decoded as JSON (the
    ``events`` WebSocket); otherwise frames are strings (the ``attach`` WebSocket).
    """

    def __init__(self, url: str, *, json_frames: bool) -> None:
        self._frames: queue.Queue[Any] = queue.Queue()
        self._json = json_frames
        self._loop = asyncio.new_event_loop()
        self._connected = threading.Event()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._problem: BaseException | None = None
        #: The close code the agent sent, once the WebSocket is closed.
        self.close_code: int | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete,
                                        args=(self._read(url),), daemon=True)
        self._thread.start()
        if not self._connected.wait(DEADLINE) or self._ws is None:
            raise RuntimeError(f"could not connect to {url}: {self._problem!r}")

    async def _read(self, url: str) -> None:
        try:
            async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
                self._ws = ws
                self._connected.set()
                async for message in ws:
                    if message.type is aiohttp.WSMsgType.TEXT:
                        data = message.data
                        self._frames.put(json.loads(data) if self._json else data)
                self.close_code = ws.close_code
        except BaseException as error:  # reported by the constructor or by next()
            self._problem = error
        finally:
            self._connected.set()
            self._frames.put(_CLOSED)

    def next(self) -> Any:
        """The next frame (waiting at most :data:`DEADLINE` seconds)."""
        frame = self._frames.get(timeout=DEADLINE)
        if frame is _CLOSED:
            self._frames.put(_CLOSED)
            raise EOFError(f"the WebSocket is closed (code {self.close_code})")
        return frame

    def until(self, predicate: Callable[[Any], bool]) -> list[Any]:
        """The frames up to and including the first one that matches ``predicate``."""
        frames = []
        while True:
            frames.append(self.next())
            if predicate(frames[-1]):
                return frames

    def send(self, text: str) -> None:
        """Send ``text`` as one text frame."""
        assert self._ws is not None
        asyncio.run_coroutine_threadsafe(self._ws.send_str(text), self._loop).result(DEADLINE)

    def close(self) -> None:
        """Close the WebSocket and wait for the thread to end."""
        ws = self._ws
        if ws is not None and not ws.closed and self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(ws.close(), self._loop)
            with contextlib.suppress(Exception):
                future.result(DEADLINE)
        self._thread.join(DEADLINE)
        if not self._thread.is_alive():
            self._loop.close()


_CLOSED = object()


def brief(event: Mapping[str, Any]) -> str:
    """An event in one short line: its kind, then what matters for that kind."""
    kind = event["event"]
    if kind == "process:state":
        return f"{kind:<18} {event['previous']} -> {event['state']}"
    if kind == "process:exit":
        return f"{kind:<18} code {event['code']}, signal {event['signal']}"
    if kind == "process:exception":
        return f"{kind:<18} {event['error']}"
    if kind in ("process:create", "process:delete"):
        return f"{kind:<18} {event['state']}"
    return f"{kind:<18} pid {'set' if event.get('pid') else None}"


class AgentProcess:
    """The real ``smartmob-agent`` command, run as ``python -m smartmob_agent``.

    It listens on a free port (``--port 0``) and keeps its files in a temporary folder;
    :meth:`start` learns the port from the ready line the agent logs on stderr.
    """

    def __init__(self, *args: str) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="smartmob-docs-"))
        self.state_dir = self.folder / "state"
        self.args = args
        self.log: list[str] = []
        self.url = ""
        self.address = ""
        self.proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self) -> AgentProcess:
        """Start the agent and wait (at most :data:`DEADLINE`) until it listens."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smartmob_agent", "--port", "0",
             "--state-dir", str(self.state_dir), *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        _running.append(self)
        # a thread keeps reading stderr, so the agent never blocks on a full pipe
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if not self._ready.wait(DEADLINE) or not self.url:
            self.kill()
            raise RuntimeError("the agent did not start:\n" + "".join(self.log))
        return self

    def _read_log(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            match = _READY.search(line)
            if match and not self.url:
                self.url = match.group(1)
                self.address = f"127.0.0.1:{match.group(2)}"
                self._ready.set()
        self._ready.set()  # end of file: the agent exited

    def stop(self) -> int:
        """Send SIGINT, as CTRL-C would, and return the agent's exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(DEADLINE)
        finally:
            self.kill()
        return code

    def kill(self) -> None:
        """SIGKILL the agent if it still runs, and remove its folder."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._reader is not None:
            self._reader.join(DEADLINE)
        shutil.rmtree(self.folder, ignore_errors=True)
        with contextlib.suppress(ValueError):
            _running.remove(self)


_running: list[AgentProcess] = []


@atexit.register
def _kill_leftovers() -> None:
    for agent in list(_running):
        agent.kill()


class Demo:
    """What one page's doctests share: a live agent, a server with the demo apps, and a
    webhook receiver."""

    def __init__(self, *agent_args: str) -> None:
        self.archives = ArchiveServer()
        self.source_url = self.archives.add("demo.tar.gz", make_tar_gz({"Procfile": PROCFILE}))
        self.broken_url = self.archives.add(
            "broken.tar.gz", make_tar_gz({"Procfile": BROKEN_PROCFILE})
        )
        self.tools_url = self.archives.add(
            "tools.tar.gz", make_tar_gz({"Procfile": TOOLS_PROCFILE, ".env": TOOLS_DOTENV})
        )
        self.receiver = WebhookReceiver()
        self.sockets: list[LiveSocket] = []
        try:
            self.agent = AgentProcess(*agent_args).start()
        except BaseException:
            self.archives.close()
            self.receiver.close()
            raise

    def events(self, url: str) -> LiveSocket:
        """Connect to an ``events`` URL; each frame is an event (closed by :meth:`stop`)."""
        socket = LiveSocket(url, json_frames=True)
        self.sockets.append(socket)
        return socket

    def attach(self, url: str, json_frames: bool = False) -> LiveSocket:
        """Connect to an ``attach`` URL; each frame is a line, or with ``json_frames``
        (for ``?format=json``) a decoded JSON frame (closed by :meth:`stop`)."""
        socket = LiveSocket(url, json_frames=json_frames)
        self.sockets.append(socket)
        return socket

    def show(self, document: Any) -> None:
        """Print a JSON document sorted and indented, with stable addresses.

        The agent's port is shown as 8080, the archive server's as 8000 and the webhook
        receiver's as 9000.
        """
        text = json.dumps(document, indent=4, sort_keys=True)
        text = text.replace(self.agent.address, "127.0.0.1:8080")
        text = text.replace(self.receiver.url.split("/")[2], "127.0.0.1:9000")
        print(text.replace(f"127.0.0.1:{self.archives.port}", "127.0.0.1:8000"))

    def stop(self) -> int:
        """Stop the agent (SIGINT), the WebSockets, the archive server and the webhook
        receiver; return the agent's exit status."""
        try:
            return self.agent.stop()
        finally:
            for socket in self.sockets:
                socket.close()
            self.archives.close()
            self.receiver.close()


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Mapping[str, str], Any]:
    """Send one request with urllib; return the status, the headers and the JSON body."""
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=DEADLINE) as response:
            return response.status, response.headers, json.load(response)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, json.load(error)


def wait_for_state(url: str, *states: str) -> dict[str, Any]:
    """Poll a process status URL until its ``state`` is one of ``states`` (with a deadline)."""
    return wait_for(url, lambda document: document["state"] in states)


def wait_for(url: str, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll a process status URL until ``predicate(document)`` is true (with a deadline)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        status, _, document = http("GET", url)
        if status == 200 and predicate(document):
            return document  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not get there; it is now: {document}")
        time.sleep(0.05)
