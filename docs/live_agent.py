"""A live agent and an archive server for the doctests of the documentation.

The doctests of ``walkthrough.rst`` and ``api.rst`` talk to the real ``smartmob-agent``
command, started here in a subprocess on a free port of 127.0.0.1, and to a real HTTP
server (also on 127.0.0.1, in a thread) that serves the source archive of a tiny app.
Nothing is mocked: when the API changes, the doctests fail.

Each page calls :func:`start` in its ``testsetup`` and :func:`stop` in its
``testcleanup``. An ``atexit`` hook kills whatever a failed build left running.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
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
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

#: How long the agent may take to say it is listening, or to stop.
DEADLINE = 30.0

#: The Procfile of the demo app: its ``web`` process prints a line every 0.2 s.
PROCFILE = 'web: while true; do echo "hello from $GREETING"; sleep 0.2; done\n'
#: The Procfile of a broken app: its command does not exist.
BROKEN_PROCFILE = "web: no-such-command --port 8000\n"

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
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(dict(self.headers.items()))
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
    """What one page's doctests share: a live agent and a server with the demo app."""

    def __init__(self, *agent_args: str) -> None:
        self.archives = ArchiveServer()
        self.source_url = self.archives.add("demo.tar.gz", make_tar_gz({"Procfile": PROCFILE}))
        self.broken_url = self.archives.add(
            "broken.tar.gz", make_tar_gz({"Procfile": BROKEN_PROCFILE})
        )
        try:
            self.agent = AgentProcess(*agent_args).start()
        except BaseException:
            self.archives.close()
            raise

    def show(self, document: Any) -> None:
        """Print a JSON document sorted and indented, with stable addresses.

        The agent's port is shown as 8080 and the archive server's as 8000.
        """
        text = json.dumps(document, indent=4, sort_keys=True)
        text = text.replace(self.agent.address, "127.0.0.1:8080")
        print(text.replace(f"127.0.0.1:{self.archives.port}", "127.0.0.1:8000"))

    def stop(self) -> int:
        """Stop the agent (SIGINT) and the archive server; return the agent's exit status."""
        try:
            return self.agent.stop()
        finally:
            self.archives.close()


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
    deadline = time.monotonic() + DEADLINE
    while True:
        status, _, document = http("GET", url)
        if status == 200 and document["state"] in states:
            return document  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} is still {document.get('state')!r}, not in {states}")
        time.sleep(0.05)
