"""Absolute ``http``/``https`` URLs for the HTTP client, split once and cached.

A proxy sends many requests to few origins, so parsing is remembered for the
last :data:`_URL_CACHE_SIZE` distinct URLs; :meth:`URL.with_target` builds a
request URL from an origin's without parsing anything.  Everything that cannot
go into an HTTP/1.1 request line is refused here with :class:`InvalidURL`, so
bad input never reaches a connection.
"""

from __future__ import annotations

import functools
import ipaddress
import re

from inferno.http.client_errors import InvalidURL
from inferno.http.pool import Origin

__all__ = ["URL", "parse_url"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_URL_CACHE_SIZE = 1024  # distinct URLs whose parse is remembered (a proxy hits few origins/paths)


class URL:
    """An absolute ``http``/``https`` URL split into what a request needs.

    Build one with :func:`parse_url`; a proxy that sends many paths to one
    origin keeps the origin's URL and calls :meth:`with_target`.
    """

    __slots__ = ("host", "host_header", "origin", "port", "scheme", "target")

    def __init__(self, scheme: str, host: str, port: int, target: bytes = b"/") -> None:
        default_port = _DEFAULT_PORTS.get(scheme)
        if default_port is None:
            raise InvalidURL(f"scheme must be http or https, not {scheme!r}")
        if not 0 < port < 65536:
            raise InvalidURL(f"port must be between 1 and 65535, not {port}")
        self.scheme = scheme
        self.host = host  # lower-case; an IPv6 address without brackets
        self.port = port
        self.target = target  # path and query: what goes in the request line
        self.origin = Origin(scheme, host, port)
        name = f"[{host}]" if ":" in host else host
        self.host_header = (name if port == default_port else f"{name}:{port}").encode("ascii")

    def with_target(self, target: str | bytes) -> URL:
        """The same origin with another request target (``/v1/models?x=1``)."""
        raw = target.encode("ascii") if isinstance(target, str) else target
        return URL(self.scheme, self.host, self.port, raw)

    def __str__(self) -> str:
        return f"{self.origin}{self.target.decode('ascii', 'replace')}"

    def __repr__(self) -> str:
        return f"URL({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, URL) and (self.origin, self.target) == (other.origin, other.target)

    def __hash__(self) -> int:
        return hash((self.origin, self.target))


# Whitespace, control characters and non-ASCII may not appear in a request line.
_FORBIDDEN_IN_URL = re.compile(r"[^\x21-\x7e]")
_HOST_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def parse_url(url: str) -> URL:
    """Split ``http(s)://host[:port][/path][?query]``; anything else raises :class:`InvalidURL`.

    IPv6 literals go in brackets (``http://[::1]:8080/``); the fragment is dropped;
    user info is refused (send an ``Authorization`` header instead).
    """
    if not isinstance(url, str):
        raise InvalidURL(f"a URL must be a string, not {type(url).__name__}")
    return _parse_url_cached(url)


@functools.lru_cache(maxsize=_URL_CACHE_SIZE)
def _parse_url_cached(url: str) -> URL:
    bad = _FORBIDDEN_IN_URL.search(url)
    if bad is not None:
        raise InvalidURL(
            f"{url!r}: {bad.group()!r} may not appear in a URL "
            "(percent-encode paths; use the xn-- form of international host names)"
        )
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in _DEFAULT_PORTS:
        raise InvalidURL(f"{url!r}: only absolute http:// and https:// URLs are supported")
    end = len(rest)
    for delimiter in "/?#":
        found = rest.find(delimiter)
        if found != -1 and found < end:
            end = found
    authority, remainder = rest[:end], rest[end:].partition("#")[0]
    if "@" in authority:
        raise InvalidURL(f"{url!r}: credentials in URLs are not supported; send a header")
    if authority.startswith("["):
        host, bracket, port_text = authority[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise InvalidURL(f"{url!r}: malformed IPv6 literal")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidURL(f"{url!r}: {host!r} is not an IPv6 address") from None
        port_text = port_text[1:]
    else:
        host, _, port_text = authority.partition(":")
        if not _HOST_NAME.fullmatch(host):
            raise InvalidURL(f"{url!r}: missing or invalid host")
    if port_text and not (port_text.isdigit() and len(port_text) <= 5):
        raise InvalidURL(f"{url!r}: port must be a number, not {port_text!r}")
    port = int(port_text) if port_text else _DEFAULT_PORTS[scheme]
    target = remainder if remainder.startswith("/") else "/" + remainder
    return URL(scheme, host.lower(), port, target.encode("ascii"))
