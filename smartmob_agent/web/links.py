"""The one place that builds URLs: absolute links from the request's scheme and host.

Behind a reverse proxy (TLS ended at the proxy, another host name), the scheme and
host the client used are those the proxy says, in ``Forwarded`` (RFC 7239) or
``X-Forwarded-Proto`` and ``X-Forwarded-Host``: believed only when the request comes
from an address of ``--trusted-proxy`` (:func:`forwarded_origin`), since anyone else
could send them to make the agent hand out links to a host of their choosing.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence

from aiohttp import web
from yarl import URL

from smartmob_agent.errors import InvalidRequest

#: Route name of each index-level link relation.
INDEX_ROUTES = {
    "index": "index", "list": "list", "create": "create", "events": "events",
    "upload": "upload", "agent-log": "agent_log",
    "bulk_start": "bulk_start", "bulk_stop": "bulk_stop", "bulk_restart": "bulk_restart",
    "bulk_delete": "bulk_delete", "tokens": "tokens", "openapi": "openapi",
    "host-stats": "host_stats", "metrics": "metrics",
    "dashboard": "dashboard",
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
    "update": "update",
    "rollback": "rollback",
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
#: A host as a proxy may forward it: a name or an IPv4 address, or an IPv6 address in
#: brackets, with a port or without.
_FORWARDED_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: The networks of ``--trusted-proxy``; :func:`smartmob_agent.web.server.make_app` sets it.
TRUSTED_PROXIES_KEY: web.AppKey[tuple[Network, ...]] = web.AppKey("trusted_proxies")


def is_trusted(address: str | None, proxies: Sequence[Network]) -> bool:
    """Whether ``address`` (as a peer or a ``Forwarded`` ``for=`` gives it: maybe in
    brackets, maybe with a port) is in one of the ``proxies`` networks.

    >>> from ipaddress import ip_network
    >>> from smartmob_agent.web.links import is_trusted
    >>> nets = [ip_network("10.0.0.0/8"), ip_network("::1")]
    >>> is_trusted("10.1.2.3", nets), is_trusted("[::1]:4711", nets), is_trusted("unknown", nets)
    (True, True, False)
    """
    if not address:
        return False
    text = address.strip()
    if text.startswith("["):  # [v6] or [v6]:port
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:  # "unknown", an obfuscated "_name": nobody we know
        return False
    return any(parsed in network for network in proxies)


def forwarded_origin(
    forwarded: Sequence[Mapping[str, str]], x_proto: str | None, x_host: str | None,
    trusted: Callable[[str | None], bool],
) -> tuple[str | None, str | None]:
    """The scheme and host a request from a trusted proxy was sent to, as the proxies
    say (``None`` for what they do not say).

    ``Forwarded`` wins over ``X-Forwarded-*``. Its elements are read from the last (the
    one our peer, the trusted proxy, added) back, for as long as each was received from
    another trusted proxy (its ``for=``): the element kept is the one the first trusted
    proxy wrote, so what the client put in the header itself is not believed. Of an
    ``X-Forwarded-*`` header that lists several values, the last counts.

    >>> from smartmob_agent.web.links import forwarded_origin
    >>> forwarded_origin([{"for": "203.0.113.9", "proto": "https", "host": "a.example"}],
    ...                  None, None, lambda address: False)
    ('https', 'a.example')
    >>> forwarded_origin([], "https", "b.example, c.example", lambda address: False)
    ('https', 'c.example')
    """
    if forwarded:
        chosen = forwarded[-1]
        for element in reversed(forwarded):
            chosen = element
            if not trusted(element.get("for")):
                break
        return chosen.get("proto"), chosen.get("host")

    return _last_value(x_proto), _last_value(x_host)


def _last_value(header: str | None) -> str | None:
    """The last of the comma-separated values of a header (``None`` if it has none)."""
    if header is None:
        return None
    return header.rpartition(",")[2].strip() or None


def _request_origin(request: web.Request) -> URL:
    """The origin of the links for ``request``: its own, or what a trusted proxy says."""
    try:
        origin = request.url.origin()
    except ValueError:  # no usable Host header: links could not be absolute
        raise InvalidRequest(
            "the request has no usable Host header, so links cannot be built"
        ) from None
    proxies = request.app.get(TRUSTED_PROXIES_KEY, ())
    if not proxies or not is_trusted(request.remote, proxies):
        return origin
    scheme, host = forwarded_origin(
        request.forwarded, request.headers.get("X-Forwarded-Proto"),
        request.headers.get("X-Forwarded-Host"),
        lambda address: is_trusted(address, proxies),
    )
    if scheme is not None and scheme.lower() not in {"http", "https"}:
        raise InvalidRequest(
            f"the proxy says the request came over {scheme!r}, which is not http or "
            "https (Forwarded proto=, or X-Forwarded-Proto)"
        )
    if host is not None and not _FORWARDED_HOST.fullmatch(host):
        raise InvalidRequest(
            f"the proxy says the request was sent to {host!r}, which is not a host "
            "name or address (Forwarded host=, or X-Forwarded-Host)"
        )
    return URL(f"{(scheme or origin.scheme).lower()}://{host or origin.raw_authority}").origin()


class RequestLinks:
    """Builds absolute URLs for the host and scheme a request came in on."""

    def __init__(self, request: web.Request) -> None:
        self._router = request.app.router
        self._origin = _request_origin(request)
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
