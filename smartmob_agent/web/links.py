"""The one place that builds URLs: absolute links from the request's scheme and host."""

from __future__ import annotations

import re

from aiohttp import web
from yarl import URL

from smartmob_agent.errors import InvalidRequest

#: Route name of each index-level link relation.
INDEX_ROUTES = {
    "index": "index", "list": "list", "create": "create", "events": "events",
    "upload": "upload", "agent-log": "agent_log",
    "bulk_start": "bulk_start", "bulk_stop": "bulk_stop", "bulk_restart": "bulk_restart",
    "bulk_delete": "bulk_delete", "tokens": "tokens", "openapi": "openapi",
}
#: Route name of each per-process link relation (``status`` is ``details`` by its seed name).
PROCESS_ROUTES = {
    "details": "details",
    "status": "details",
    "attach": "attach",
    "logs": "logs",
    "delete": "delete",
    "start": "start",
    "stop": "stop",
    "restart": "restart",
    "signal": "signal",
}
#: Route name of each per-key relation (minted keys).
KEY_ROUTES = {"revoke": "revoke_token"}
#: Relations that are WebSockets, hence ``ws://`` or ``wss://``.
WEBSOCKET_RELATIONS = frozenset({"attach", "events"})
#: Stands for the slug while a link template is built (slugs never contain it).
_SLUG = "~slug~"
#: Route name of an uploaded archive (``/sources/{sha256}``).
SOURCE_ROUTE = "source"
#: A SHA-256 as the path of an uploaded archive spells it.
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


class RequestLinks:
    """Builds absolute URLs for the host and scheme a request came in on."""

    def __init__(self, request: web.Request) -> None:
        self._router = request.app.router
        try:
            self._origin = request.url.origin()
        except ValueError:  # no usable Host header: links could not be absolute
            raise InvalidRequest(
                "the request has no usable Host header, so links cannot be built"
            ) from None
        self._templates: dict[str, tuple[str, str]] = {}

    def _absolute(self, relative: URL, websocket: bool) -> str:
        origin = self._origin
        if websocket:
            origin = origin.with_scheme("wss" if origin.scheme == "https" else "ws")
        return str(origin.join(relative))

    def index(self, relation: str) -> str:
        """Return the URL of an index-level relation (``list``, ``create``)."""
        route = self._router[INDEX_ROUTES[relation]]
        return self._absolute(route.url_for(), relation in WEBSOCKET_RELATIONS)

    def process(self, relation: str, slug: str) -> str:
        """Return the URL of a per-process relation (``details``, ``attach``, ...)."""
        # a listing builds thousands of links: build each relation's URL once, then put
        # the slug in (slugs need no quoting in a path: their charset is [A-Za-z0-9_.-])
        template = self._templates.get(relation)
        if template is None:
            route = self._router[PROCESS_ROUTES[relation]]
            url = self._absolute(route.url_for(slug=_SLUG), relation in WEBSOCKET_RELATIONS)
            before, _, after = url.partition(_SLUG)
            template = self._templates[relation] = (before, after)
        return template[0] + slug + template[1]

    def key(self, relation: str, key_id: str) -> str:
        """Return the URL of a per-key relation (``revoke``) of minted key ``key_id``."""
        route = self._router[KEY_ROUTES[relation]]
        return self._absolute(route.url_for(key_id=key_id), websocket=False)

    def source(self, sha256: str) -> str:
        """Return the URL the agent serves the uploaded archive of SHA-256 ``sha256`` at."""
        route = self._router[SOURCE_ROUTE]
        return self._absolute(route.url_for(sha256=sha256), websocket=False)

    def uploaded_sha256(self, url: str) -> str | None:
        """The SHA-256 (lowercase hex) that ``url`` names if it is the URL of an upload
        to this agent, as :meth:`source` builds it for this request's origin; else
        ``None``.

        A create request may give such a URL without a ``checksum``: the agent then
        reads the archive from its cache instead of asking itself for it over HTTP (a
        request that would need a key of its own, and a host name that may only work
        from outside). The origin must match, so another agent's upload URL is just a
        URL to download from.
        """
        try:
            given = URL(url)
            origin = given.origin()
        except (ValueError, TypeError):
            return None
        if origin != self._origin or given.raw_query_string or given.raw_fragment:
            return None
        template = self._router[SOURCE_ROUTE].url_for(sha256=_SLUG).path
        before, _, after = template.partition(_SLUG)
        path = given.path
        if not (path.startswith(before) and path.endswith(after)):
            return None
        digest = path[len(before):len(path) - len(after)]
        return digest.lower() if _SHA256.fullmatch(digest) else None
