"""The one place that builds URLs: absolute links from the request's scheme and host."""

from __future__ import annotations

from aiohttp import web
from yarl import URL

from smartmob_agent.errors import InvalidRequest

#: Route name of each index-level link relation.
INDEX_ROUTES = {
    "index": "index", "list": "list", "create": "create", "events": "events",
    "bulk_start": "bulk_start", "bulk_stop": "bulk_stop", "bulk_restart": "bulk_restart",
    "bulk_delete": "bulk_delete",
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
#: Relations that are WebSockets, hence ``ws://`` or ``wss://``.
WEBSOCKET_RELATIONS = frozenset({"attach", "events"})
#: Stands for the slug while a link template is built (slugs never contain it).
_SLUG = "~slug~"


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
