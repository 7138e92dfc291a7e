"""Where the agent's log records go (``--logging-endpoint``): pure.

The original agent's endpoints, with its error messages: ``file://`` and a path
(``file:///dev/stdout``, ``file:///dev/stderr``, ``file://./relative.log``,
``file:///var/log/smartmob-agent.log``), or ``fluent://host:port/tag`` for a FluentD (or
Fluent Bit) forward input, each record tagged ``<tag>.<event>``.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

#: The port of FluentD's forward input, when a ``fluent://`` URL names none.
FLUENT_PORT = 24224
#: The path of ``file://`` that means the agent's own standard output.
STDOUT = "/dev/stdout"
#: The path of ``file://`` that means the agent's own standard error.
STDERR = "/dev/stderr"


@dataclass(frozen=True)
class Endpoint:
    """A parsed ``--logging-endpoint``: a file (``path``) or a FluentD input."""

    #: ``file`` or ``fluent``
    scheme: str
    #: the file, for ``file`` (:data:`STDOUT` and :data:`STDERR` mean the streams)
    path: str = ""
    host: str = ""
    port: int = FLUENT_PORT
    #: the first part of every record's tag, for ``fluent`` (may be empty)
    tag: str = ""


def parse_endpoint(url: str) -> Endpoint:
    """Parse a ``--logging-endpoint`` URL.

    >>> from smartmob_agent.output.endpoint import parse_endpoint
    >>> parse_endpoint("file://./agent.log")
    Endpoint(scheme='file', path='./agent.log', host='', port=24224, tag='')
    >>> parse_endpoint("fluent://127.0.0.1:24225/smartmob")
    Endpoint(scheme='fluent', path='', host='127.0.0.1', port=24225, tag='smartmob')
    >>> parse_endpoint("syslog://localhost")
    Traceback (most recent call last):
    ValueError: Invalid logging endpoint "syslog://localhost".
    >>> parse_endpoint("fluent://localhost:forward/smartmob")
    Traceback (most recent call last):
    ValueError: Invalid URL: "fluent://localhost:forward/smartmob".

    Raises:
        ValueError: with the original agent's message: ``Invalid logging endpoint
            "<url>".`` for a scheme other than ``file://`` and ``fluent://`` (or a file
            with no path), ``Invalid URL: "<url>".`` for a ``fluent://`` URL without a
            host, with a port that is not one, a query or a fragment.
    """
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if separator and scheme == "file" and rest:
        return Endpoint("file", path=rest)
    if not separator or scheme != "fluent":
        raise ValueError(f'Invalid logging endpoint "{url}".')
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port  # a ValueError for letters or a number beyond 65535
    except ValueError:
        port = -1
    if not parts.hostname or parts.query or parts.fragment or port == -1 or port == 0:
        raise ValueError(f'Invalid URL: "{url}".')
    return Endpoint(
        "fluent", host=parts.hostname, port=port or FLUENT_PORT, tag=parts.path[1:]
    )
