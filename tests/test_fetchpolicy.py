"""The fetch policy, pure: which source URLs and which addresses are refused, and why."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from smartmob_agent.sources.fetchpolicy import FetchPolicy, parse_allow_entry

DEFAULT = FetchPolicy()
FILES = FetchPolicy(file_root=PurePosixPath("/srv/releases"))


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/app.tar.gz",
        "https://example.com:8443/app.zip?token=x",
        "HTTPS://Example.COM/app.zip",
        "http://127.0.0.1:8000/a.tgz",  # loopback: tests and uploads use it
        "http://[::1]:8000/a.tgz",
        "http://localhost/a.tgz",
        "http://10.1.2.3/a.tgz",  # private networks: internal artifact servers
        "http://192.168.0.10/a.tgz",
        "http://169.253.255.255/a.tgz",  # just below the link-local network
        "http://169.255.0.1/a.tgz",  # just above it
        "http://[fec0::1]/a.tgz",  # just above fe80::/10
        "http://[fd00:ec2::253]/a.tgz",  # next to the metadata address
        "http://u:p@example.com/a.tgz",
    ],
)
def test_allowed_by_default(url: str) -> None:
    """http and https URLs of any other host are fetched, loopback and private included."""
    assert DEFAULT.check_url(url) is None


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local"),
        ("http://169.254.0.1/a.tgz", "169.254.0.1 is a link-local"),
        ("https://169.254.255.255/a.tgz", "is a link-local"),
        ("http://[fe80::1]/a.tgz", "fe80::1 is a link-local address"),
        ("http://[fe80::1%25eth0]/a.tgz", "fe80::1 is a link-local address"),
        ("http://[febf:ffff::1]/a.tgz", "is a link-local address"),
        ("http://[fd00:ec2::254]/a.tgz", "fd00:ec2::254 is the address of a cloud metadata"),
        ("http://100.100.100.200/a.tgz", "is the address of a cloud metadata"),
        ("http://[::ffff:169.254.169.254]/", "(that is 169.254.169.254) is a link-local"),
        ("http://[64:ff9b::a9fe:a9fe]/", "(that is 169.254.169.254) is a link-local"),
        ("http://[2002:a9fe:a9fe::1]/", "(that is 169.254.169.254) is a link-local"),
        ("http://2852039166/", "is not written as an IP address should be"),
        ("http://0xa9fea9fe/", "is not written as an IP address should be"),
        ("http://169.254.43518/", "is not written as an IP address should be"),
        ("http://0251.0376.0251.0376/", "is not written as an IP address should be"),
        ("ftp://example.com/a.zip", "ftp:// is not allowed: only http:// and https://"),
        ("gopher://127.0.0.1:6379/_x", "gopher:// is not allowed"),
        ("file:///etc/passwd", "file:// URLs are not allowed"),
        ("/relative/a.zip", "a URL without a scheme is not allowed"),
        ("http:///a.zip", "the URL is not valid: it names no host"),
        ("http://[::1/a.zip", "the URL is not valid"),
    ],
)
def test_refused_by_default(url: str, reason: str) -> None:
    """Link-local and metadata addresses, however written, and other schemes are refused."""
    problem = DEFAULT.check_url(url)
    assert problem is not None
    assert reason in problem, problem


def test_a_redirect_to_a_file_url_is_refused_even_when_file_sources_are_allowed() -> None:
    """A server cannot make the agent read its local files by redirecting there."""
    url = "file:///srv/releases/app.tgz"
    assert FILES.check_url(url) is None
    assert FILES.check_url(url, redirect=True) == (
        "a redirect to a file:// URL is never followed"
    )


ALLOW = FetchPolicy(allow=("Example.com", "*.corp.example", "10.0.0.0/8", "169.254.10.5"))


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://example.com/a.tgz", True),
        ("https://EXAMPLE.com./a.tgz", True),  # case and a trailing dot do not matter
        ("https://www.example.com/a.tgz", False),  # a name is that name only
        ("https://example.com.evil.test/a.tgz", False),
        ("https://evilexample.com/a.tgz", False),
        ("https://ci.corp.example/a.tgz", True),
        ("https://a.b.corp.example/a.tgz", True),
        ("https://corp.example/a.tgz", False),  # *. means the names under it
        ("https://xcorp.example/a.tgz", False),
        ("http://10.1.2.3/a.tgz", True),
        ("http://11.1.2.3/a.tgz", False),
        ("http://127.0.0.1/a.tgz", False),  # the list is the whole list
        ("http://169.254.10.5/a.tgz", True),  # listed: the refusal is lifted for it
        ("http://169.254.169.254/a.tgz", False),
    ],
)
def test_allow_list(url: str, allowed: bool) -> None:
    """With an allow-list, only its hosts are fetched; an address or network listed
    matches hosts written as addresses, and lifts the default refusal for them."""
    problem = ALLOW.check_url(url)
    assert (problem is None) is allowed, problem
    if not allowed and "169.254.169.254" not in url:
        assert problem is not None
        assert "is not on the allow-list of source hosts (--source-allow)" in problem


def test_a_listed_network_lifts_the_refusal_of_resolved_addresses_too() -> None:
    """check_address (a name's resolved address) follows the same exemption."""
    assert ALLOW.check_address("169.254.10.5") is None
    assert ALLOW.check_address("169.254.169.254") is not None
    assert DEFAULT.check_address("169.254.10.5") is not None


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("169.254.169.254", True), ("fe80::1%eth0", True), ("fd00:ec2::254", True),
        ("::ffff:169.254.169.254", True), ("127.0.0.1", False), ("::1", False),
        ("8.8.8.8", False), ("2001:db8::1", False), ("not an address", True),
    ],
)
def test_check_address(address: str, refused: bool) -> None:
    """The addresses a resolver returns are checked by the same rules."""
    assert (DEFAULT.check_address(address) is not None) is refused


@pytest.mark.parametrize(
    ("text", "entry"),
    [
        ("example.com", "example.com"), ("  Example.COM.  ", "example.com"),
        ("*.Example.com", "*.example.com"), ("café.example", "xn--caf-dma.example"),
        ("10.0.0.1", "10.0.0.1/32"), ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3/8", "10.0.0.0/8"), ("[::1]", "::1/128"), ("fd00::/8", "fd00::/8"),
    ],
)
def test_allow_entries_are_normalised(text: str, entry: str) -> None:
    """Allow-list entries are compared lowercase, IDNA-encoded, networks canonical."""
    assert parse_allow_entry(text) == entry


@pytest.mark.parametrize(
    "text", ["", "*", "*.", "http://example.com/", "example.com/path", "a b", "127.1",
             "2852039166", "ex ample.com", "example.com:8080", "x" * 300],
)
def test_bad_allow_entries_are_refused(text: str) -> None:
    """An entry that is not a name, *.domain, address or network is a configuration error."""
    with pytest.raises(ValueError, match="must be a host name"):
        parse_allow_entry(text)


# -- file:// -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "parts"),
    [
        ("file:///srv/releases/app.tgz", ("app.tgz",)),
        ("file://localhost/srv/releases/app.tgz", ("app.tgz",)),
        ("file:///srv/releases/shop/v2/app%20one.tgz", ("shop", "v2", "app one.tgz")),
        ("file:///srv/releases//shop/app.tgz", ("shop", "app.tgz")),
        ("file:///srv/releases/caf%C3%A9.tgz", ("café.tgz",)),
        ("file:///srv/releases/odd%FF.tgz", ("odd\udcff.tgz",)),  # bytes kept as bytes
    ],
)
def test_file_urls_under_the_folder(url: str, parts: tuple[str, ...]) -> None:
    """A file:// URL under the folder of file sources names a path inside it."""
    assert FILES.check_url(url) is None
    assert FILES.file_parts(url) == parts


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("file:///etc/passwd", "must name a file under /srv/releases"),
        ("file:///srv/releases", "must name a file under /srv/releases"),
        ("file:///srv/releases/", "must name a file under /srv/releases"),
        ("file:///srv/releasesX/app.tgz", "must name a file under /srv/releases"),
        ("file:///srv/releases/../../etc/passwd", "without '.', '..'"),
        ("file:///srv/releases/%2e%2e/secret", "without '.', '..'"),
        ("file:///srv/releases/./app.tgz", "without '.', '..'"),
        ("file:///srv/releases/a%2f..%2f..%2fetc%2fpasswd", "encoded '/'"),
        ("file:///srv/releases/a%00.tgz", "NUL"),
        ("file://otherhost/srv/releases/app.tgz", "names no host"),
        ("file:///srv/releases/app.tgz?x=1", "no query"),
    ],
)
def test_file_urls_outside_the_folder_are_refused(url: str, reason: str) -> None:
    """Anything that is not plainly a file under the folder is refused, from the URL."""
    problem = FILES.check_url(url)
    assert problem is not None
    assert reason in problem, problem
    with pytest.raises(ValueError, match="file://"):
        FILES.file_parts(url)


def test_without_a_folder_no_file_url_is_read() -> None:
    """file:// is refused unless the agent was given a folder, naming the flag."""
    problem = DEFAULT.check_url("file:///srv/releases/app.tgz")
    assert problem is not None
    assert "--allow-file-sources" in problem


def test_the_folder_must_be_absolute() -> None:
    with pytest.raises(ValueError, match="absolute"):
        FetchPolicy(file_root=PurePosixPath("releases"))


def test_the_root_folder_allows_any_file() -> None:
    """/ as the folder of file sources allows every file (its own choice)."""
    policy = FetchPolicy(file_root=PurePosixPath("/"))
    assert policy.file_parts("file:///etc/hostname") == ("etc", "hostname")
