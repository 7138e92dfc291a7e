"""The one place that builds URLs: absolute links from the request's scheme and host."""

from __future__ import annotations

from aiohttp import web
from yarl import URL

from smartmob_agent.errors import InvalidRequest

#: Route name of each index-level link relation.
INDEX_ROUTES = {"index": "index", "list": "list", "create": "create"}
#: Route name of each per-process link relation (``status`` is ``details`` by its seed name).
PROCESS_ROUTES = {
    "details": "details",
    "status": "details",
    "attach": "attach",
    "delete": "delete",
}
#: Relations that are WebSockets, hence ``ws://`` or ``wss://``.
WEBSOCKET_RELATIONS = frozenset({"attach"})


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
        route = self._router[PROCESS_ROUTES[relation]]
        return self._absolute(route.url_for(slug=slug), relation in WEBSOCKET_RELATIONS)
