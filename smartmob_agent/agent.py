"""The registry of every process on this machine: the only object the web layer uses.

:class:`Agent` creates, lists, finds and deletes :class:`~smartmob_agent.watcher.Watcher`
objects, owns what they share (the HTTP client session, the reaper, the state folder)
and stops them all on shutdown.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

import aiohttp

from smartmob_agent import archive
from smartmob_agent.child import Reaper
from smartmob_agent.config import Settings
from smartmob_agent.errors import Conflict, NotFound
from smartmob_agent.model import ProcessInfo, Spec
from smartmob_agent.watcher import Runtime, Watcher

log = logging.getLogger(__name__)

#: Set in every child's environment; the guardian finds the agent's descendants by it.
AGENT_ID_VARIABLE = "SMARTMOB_AGENT_ID"


class Agent:
    """All processes of this agent.

    Use as ``async with Agent(settings) as agent:``, or call :meth:`start` and
    :meth:`close`.

    Args:
        settings: configuration (state folder, stop timeout, download limits).
        reaper: reaps children; the CLI passes one that also reaps orphans.
        base_env: the environment children start from (default: the agent's own).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        reaper: Reaper | None = None,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.id = uuid.uuid4().hex
        self.reaper = reaper or Reaper()
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._watchers: dict[str, Watcher] = {}
        self._session: aiohttp.ClientSession | None = None
        self._runtime: Runtime | None = None

    @property
    def processes_dir(self) -> Path:
        """Folder holding one work folder per process."""
        return self.settings.state_dir / "processes"

    async def start(self) -> None:
        """Prepare the state folder and the HTTP client used for downloads."""
        self.processes_dir.mkdir(parents=True, exist_ok=True)
        self._session = aiohttp.ClientSession(auto_decompress=True)
        self._runtime = Runtime(
            session=self._session,
            reaper=self.reaper,
            base_env=self._base_env,
            forced_env={AGENT_ID_VARIABLE: self.id},
            limits=archive.DownloadLimits(
                max_bytes=self.settings.max_download,
                stall=self.settings.download_stall,
                total=self.settings.download_timeout,
            ),
            stop_timeout=self.settings.stop_timeout,
        )

    async def close(self) -> None:
        """Stop every process (each with the full stop sequence), then release resources."""
        await self.stop_all()
        if self._session is not None:
            await self._session.close()
        self.reaper.close()

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the API's verbs ---------------------------------------------------------------------

    def create(self, spec: Spec, request_id: str | None = None) -> Watcher:
        """Register a process and start provisioning it in the background.

        Raises:
            Conflict: a process with the same slug exists (or is being deleted).
        """
        assert self._runtime is not None, "Agent.start() first"
        slug = spec.slug
        if slug in self._watchers:
            raise Conflict(f"a process named {slug!r} already exists; delete it first")
        watcher = Watcher(spec, self.processes_dir / slug, self._runtime, request_id)
        self._watchers[slug] = watcher
        watcher.start()
        log.info("%s: created (process type %r)", slug, spec.process_type)
        return watcher

    def get(self, slug: str) -> Watcher:
        """Return the watcher of ``slug``.

        Raises:
            NotFound: no such process.
        """
        try:
            return self._watchers[slug]
        except KeyError:
            raise NotFound(f"there is no process named {slug!r}") from None

    def list(self) -> list[ProcessInfo]:
        """Snapshots of every process, in creation order."""
        return [watcher.info() for watcher in self._watchers.values()]

    def watchers(self) -> builtins.list[Watcher]:
        """Every watcher, in creation order."""
        return list(self._watchers.values())

    async def delete(self, slug: str) -> None:
        """Stop the process, wait until it is gone, remove its files and forget it.

        Raises:
            NotFound: no such process.
        """
        watcher = self.get(slug)
        try:
            await watcher.stop()
            # files go before the name is freed, so a new process of that name starts clean
            await watcher.remove_files()
        finally:  # even if interrupted: a slug must never be stuck half-deleted
            if self._watchers.get(slug) is watcher:
                del self._watchers[slug]
                log.info("%s: deleted", slug)

    async def stop_all(self) -> None:
        """Stop every process at once and wait until all are gone."""
        watchers = list(self._watchers.values())
        if watchers:
            log.info("stopping %d process(es)", len(watchers))
        results = await asyncio.gather(*(w.stop() for w in watchers), return_exceptions=True)
        for watcher, result in zip(watchers, results, strict=True):
            if isinstance(result, BaseException):
                log.error("%s: stop failed: %r", watcher.spec.slug, result)
