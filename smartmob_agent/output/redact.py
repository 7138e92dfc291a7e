"""Credentials kept out of log lines: pure.

A URL in a log line may carry a credential in its query: the access log's request line
(a WebSocket's ``?token=<key>``, or a key a client sent under another name by mistake),
a source URL in an error (a pre-signed download's ``X-Amz-Signature=...``), a URL inside
another's query. :func:`redact` hides the value of every query parameter whose name
looks like a credential, however it is written: any case, percent-encoded (``%74oken``,
even twice), inside a percent-encoded URL (``?next=https%3A%2F%2Fx%3Ftoken%3D...``).
It hides too much rather than too little: a parameter named ``monkey`` loses its value
in the log too.
"""

from __future__ import annotations

import re
import urllib.parse

#: A parameter whose name (decoded, in lower case) holds one of these is a credential.
CREDENTIAL_WORDS = (
    "token", "key", "secret", "passw", "pwd", "auth", "sig", "credential", "session",
    "cookie", "jwt",
)
#: What a hidden value is replaced with.
HIDDEN = "[hidden]"

# a parameter: what starts it (?, & or ;, maybe percent-encoded), its name, = (maybe
# encoded), and its value up to the next parameter (&, maybe encoded) or a space: the
# agent reads a key up to "&", quotes and ";" included (aiohttp takes a raw '"' in a
# query), so a value hidden a quote too far ('...?token=[hidden]' losing its closing
# quote) is the price of never showing the end of a key
_PARAMETER = re.compile(
    r"(?P<head>(?:[?&;]|%3[Ff]|%26)"
    r"(?P<name>(?:(?!%3[Dd]|%26)[^=?&;#\s\"'<>])+)"
    r"(?:=|%3[Dd]))"
    r"(?P<value>(?:(?!%26)[^&\s])*)"
)
#: How many times a name is percent-decoded, at most (``%2574oken`` is ``token`` twice
#: encoded).
_DECODINGS = 3


def looks_like_a_credential(name: str) -> bool:
    """Whether a query parameter's ``name`` (as written in a URL) names a credential.

    >>> from smartmob_agent.output.redact import looks_like_a_credential
    >>> [looks_like_a_credential(n) for n in ("TOKEN", "%74oken", "%2541pi_Key", "tail")]
    [True, True, True, False]
    """
    for _ in range(_DECODINGS):
        decoded = urllib.parse.unquote_plus(name)
        if decoded == name:
            break
        name = decoded
    folded = name.casefold()
    return any(word in folded for word in CREDENTIAL_WORDS)


def redact(text: str) -> str:
    """``text`` with the value of every credential-like query parameter hidden.

    >>> from smartmob_agent.output.redact import redact
    >>> redact('"GET /events?app=shop&Token=abc&tail=5 HTTP/1.1" 101')
    '"GET /events?app=shop&Token=[hidden]&tail=5 HTTP/1.1" 101'
    >>> redact("fetching https://s3.example/a.tgz?X-Amz-Signature=f00&access_token=x1")
    'fetching https://s3.example/a.tgz?X-Amz-Signature=[hidden]&access_token=[hidden]'
    >>> redact("/login?next=https%3A%2F%2Fx%2F%3Fapi_key%3Ds3cr3t%26a%3Db")
    '/login?next=https%3A%2F%2Fx%2F%3Fapi_key%3D[hidden]%26a%3Db'
    >>> redact('a=1;pwd=x;y&b=2 ?token= <key> "GET /?token=ab"c HTTP/1.1"')
    'a=1;pwd=[hidden]&b=2 ?token= <key> "GET /?token=[hidden] HTTP/1.1"'
    """
    if "=" not in text and "%3" not in text:
        return text  # nothing that could be a parameter: most log lines
    return _PARAMETER.sub(_hide, text)


def _hide(match: re.Match[str]) -> str:
    value = match["value"]
    if value and looks_like_a_credential(match["name"]):
        return match["head"] + HIDDEN
    # a URL inside the value may carry parameters of its own
    return match["head"] + redact(value)
