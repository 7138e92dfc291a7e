"""The ``checksum`` of a create request: the downloaded archive is verified before it is
unpacked."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from aiohttp.test_utils import TestClient

from smartmob_agent.model import ProcessState as S
from smartmob_agent.supervision.agent import Agent
from tests.conftest import ArchiveServer
from tests.helpers import app_archive, wait_for_state

Client = TestClient[Any, Any]


def request(url: str, checksum: str) -> dict[str, Any]:
    return {"app": "shop", "node": "web.0", "process_type": "web", "source_url": url,
            "checksum": checksum}


async def create(client: Client, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = await client.post("/create-process", data=json.dumps(body))
    return response.status, await response.json()


async def test_a_matching_checksum_runs(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """An archive whose SHA-256 matches runs; the digest may be given in upper case and is
    shown in lower case."""
    data = app_archive("web: exec sleep 1000\n")
    url = archive_server.add("app.tgz", data)
    digest = hashlib.sha256(data).hexdigest()
    status, document = await create(client, request(url, f"sha256:{digest.upper()}"))
    assert status == 201
    assert document["checksum"] == f"sha256:{digest}"
    await wait_for_state(agent.get("shop.web.0"), S.RUNNING)


async def test_a_mismatch_fails_with_both_digests_and_unpacks_nothing(
    client: Client, agent: Agent, archive_server: ArchiveServer
) -> None:
    """A different archive fails the process with both digests in ``error``; no file of it
    is unpacked, and the partial download is gone."""
    data = app_archive("web: exec sleep 1000\n")
    url = archive_server.add("app.tgz", data)
    wrong = "0" * 64
    status, _ = await create(client, request(url, f"sha256:{wrong}"))
    assert status == 201
    watcher = agent.get("shop.web.0")
    await wait_for_state(watcher, S.FAILED)
    assert watcher.error is not None
    assert hashlib.sha256(data).hexdigest() in watcher.error
    assert wrong in watcher.error
    assert "nothing was unpacked" in watcher.error
    assert sorted(path.name for path in watcher.workdir.iterdir()) == []


async def test_a_badly_written_checksum_is_a_400(client: Client, agent: Agent) -> None:
    """Only ``sha256:`` and 64 hexadecimal digits are accepted, before anything is created."""
    for checksum in ["md5:" + "0" * 32, "sha256:" + "0" * 63, "sha256:" + "g" * 64, "0" * 64]:
        status, document = await create(client, request("http://127.0.0.1:9/a.tgz", checksum))
        assert status == 400
        assert "checksum" in document["fields"]
    assert agent.list() == []
