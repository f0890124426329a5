"""Client access to the service port: API keys and per-client rate limits.

**API keys.**  With ``--api-keys FILE`` every request must carry
``Authorization: Bearer <key>`` for a key in the file, else 401 in the OpenAI
error shape.  The file holds one key per line, optionally named::

    # comments and blank lines are ignored
    sk-team-a-0123456789               a key, named after its digest
    team-b:sk-team-b-9876543210        name:key
    team-c:sha256:5e884898da28...      name:sha256:<64 hex digits>, "hashed at rest"
    sha256:a665a45920422f9d...         an unnamed hashed key

Keys are held only as SHA-256 digests, and the file itself may hold nothing
else: ``python -m inferno_proxy.auth hash < keys.txt > keys.hashed`` turns a
file of plain keys into hashed lines (``python -m inferno_proxy.auth new NAME``
makes a fresh random key and prints both the key, for the client, and its
hashed line, for the file).  API keys are long random strings, so an unsalted
fast hash is enough: there is no dictionary to attack, unlike passwords.

A presented key is hashed and looked up by digest, then the stored digest is
compared with :func:`hmac.compare_digest`.  The lookup's timing depends only
on the digest of what the client sent, which reveals nothing about stored keys.

Several keys may share a name (a client rotating its key); they then share
one rate limit, which is kept per name.

**Rate limits.**  Token buckets (:class:`~inferno_proxy.budget.RateLimiter`)
per client IP address, applied before the key is checked so that guessing
keys is rate limited too, and per key name.  Over the limit: 429 with
``Retry-After``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from inferno.errors import HTTPError
from inferno_proxy.budget import RateLimiter, retry_after_header

__all__ = [
    "HASH_PREFIX",
    "ApiKeyFileError",
    "ApiKeys",
    "RateLimits",
    "Spending",
    "hash_key",
    "hashed_lines",
    "main",
]

HASH_PREFIX: Final = "sha256:"
MAX_KEY_BYTES: Final = 1024  # longer Authorization values are refused unhashed (no work for junk)
NEW_KEY_BYTES: Final = 32  # random bytes in a generated key: 256 bits
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
_NAME = re.compile(r"[A-Za-z0-9_.@/+-]{1,128}")


class ApiKeyFileError(ValueError):
    """Raised when an API key file cannot be read or has a bad line (named with its number)."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def hash_key(key: str) -> str:
    """The at-rest form of *key*: ``sha256:<hex digest>``."""
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def hashed_lines(lines: Iterable[str], source: str = "<keys>") -> list[str]:
    """Key file lines with every key hashed; comments, blanks and hashed keys unchanged.

    :raises ApiKeyFileError: naming the first invalid line.
    """
    out = []
    for number, line in enumerate(lines, start=1):
        entry = _parse_line(line, source, number)
        if entry is None:
            out.append(line.rstrip("\r\n"))
            continue
        name, digest, named = entry
        hashed = HASH_PREFIX + digest.hex()
        out.append(f"{name}:{hashed}" if named else hashed)
    return out


def _parse_line(line: str, source: str, number: int) -> tuple[str, bytes, bool] | None:
    """``(name, digest, named)`` for one line, ``None`` for a comment or blank line."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    where = f"{source}:{number}"
    if text.startswith(HASH_PREFIX):
        return _hashed(text, where, None)
    name, colon, rest = text.partition(":")
    if colon and rest.startswith(HASH_PREFIX):
        return _hashed(rest, where, name)
    if colon and _NAME.fullmatch(name) and rest:
        named, key = True, rest
    else:
        named, key = False, text  # no name: the whole line is the key
    if any(c.isspace() for c in key):
        raise ApiKeyFileError(f"{where}: a key must not contain white space")
    if named and not _NAME.fullmatch(name):
        raise ApiKeyFileError(f"{where}: invalid key name {name!r}")
    digest = _digest(key)
    return (name if named else _default_name(digest)), digest, named


def _hashed(text: str, where: str, name: str | None) -> tuple[str, bytes, bool]:
    hexdigest = text[len(HASH_PREFIX) :]
    if not _HEX_DIGEST.fullmatch(hexdigest):
        raise ApiKeyFileError(f"{where}: expected sha256: and 64 hex digits after it")
    if name is not None and not _NAME.fullmatch(name):
        raise ApiKeyFileError(f"{where}: invalid key name {name!r}")
    digest = bytes.fromhex(hexdigest)
    return (name or _default_name(digest)), digest, name is not None


def _default_name(digest: bytes) -> str:
    return "key-" + digest[:6].hex()  # enough to tell keys apart in logs, useless to attackers


class ApiKeys:
    """The accepted API keys, by SHA-256 digest, each with a name.

    Build it with :meth:`from_file` or :meth:`from_lines`; replace the
    service's instance to reload.
    """

    __slots__ = ("_entries",)

    def __init__(self, digests: dict[bytes, str]) -> None:
        """*digests*: key name by SHA-256 digest of the key."""
        self._entries = {digest: (digest, name) for digest, name in digests.items()}

    @classmethod
    def from_lines(cls, lines: Iterable[str], source: str = "<keys>") -> ApiKeys:
        """Parse key file lines (see the module docstring).

        :raises ApiKeyFileError: naming the first bad line, or when no key is given.
        """
        names: dict[bytes, str] = {}
        lines_of: dict[bytes, int] = {}
        for number, line in enumerate(lines, start=1):
            entry = _parse_line(line, source, number)
            if entry is None:
                continue
            name, digest, _ = entry
            if digest in names and names[digest] != name:
                raise ApiKeyFileError(
                    f"{source}:{number}: the same key as line {lines_of[digest]} "
                    f"under another name ({names[digest]!r})"
                )
            names[digest] = name
            lines_of.setdefault(digest, number)
        if not names:
            raise ApiKeyFileError(f"{source}: no API key in the file (every request would get 401)")
        return cls(names)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ApiKeys:
        """Read a key file.

        :raises ApiKeyFileError: when it cannot be read or has a bad line.
        """
        try:
            with open(path, encoding="utf-8") as file:
                return cls.from_lines(file.readlines(), os.fspath(path))
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiKeyFileError(f"cannot read API keys from {os.fspath(path)}: {exc}") from exc

    def __len__(self) -> int:
        return len(self._entries)

    def identify(self, authorization: str | None) -> str | None:
        """The name of the key an ``Authorization`` header value carries, or ``None``."""
        if not authorization:
            return None
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key or len(key) > MAX_KEY_BYTES:
            return None
        digest = _digest(key)
        # The dict finds the candidate by digest (its timing depends on a SHA-256
        # output, which an attacker cannot steer towards a stored one);
        # compare_digest then confirms the match in constant time.
        entry = self._entries.get(digest)
        if entry is not None and hmac.compare_digest(entry[0], digest):
            return entry[1]
        return None

    def require(self, authorization: str | None) -> str:
        """The key's name, or the 401 to answer.

        :raises HTTPError: 401 ``invalid_api_key`` with ``WWW-Authenticate: Bearer``.
        """
        name = self.identify(authorization)
        if name is None:
            message = (
                "missing API key: send it as 'Authorization: Bearer <key>'"
                if not authorization
                else "invalid API key"
            )
            raise HTTPError(
                401, message, code="invalid_api_key", headers=[("www-authenticate", "Bearer")]
            )
        return name


class Spending(NamedTuple):
    """Tokens allowed per key name and per client address (one process's, or a sum)."""

    per_key: dict[str, float]
    per_ip: dict[str, float]

    def add(self, other: Spending) -> None:
        """Add *other*'s tokens to these (in place)."""
        for mine, theirs in ((self.per_key, other.per_key), (self.per_ip, other.per_ip)):
            for key, tokens in theirs.items():
                mine[key] = mine.get(key, 0.0) + tokens

    def minus(self, own: Spending | None) -> Spending:
        """These tokens without *own*'s (keys left with none dropped): what the other
        processes spent, when these are everyone's and *own* one process's part."""
        if own is None:
            return self
        parts = []
        for everyone, mine in ((self.per_key, own.per_key), (self.per_ip, own.per_ip)):
            if not mine:
                parts.append(everyone)
                continue
            rest: dict[str, float] = {}
            for key, tokens in everyone.items():
                left = tokens - mine.get(key, 0.0)
                if left > 0.0:
                    rest[key] = left
            parts.append(rest)
        return Spending(parts[0], parts[1])


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Per-client request rates on the service port; ``None`` for no limit.

    :ivar per_key: a bucket per API key name (only applies with API keys).
    :ivar per_ip: a bucket per client IP address.
    """

    per_key: RateLimiter | None = None
    per_ip: RateLimiter | None = None

    @classmethod
    def build(
        cls,
        *,
        per_key: float = 0.0,
        per_ip: float = 0.0,
        burst: float = 20.0,
        shared: bool = False,
    ) -> RateLimits:
        """Limits from requests per second (0: unlimited) and a shared burst size.

        :param shared: the limits are kept across processes (see
            :class:`~inferno_proxy.budget.RateLimiter`, "Shared").
        :raises ValueError: on a negative rate or a burst below 1.
        """
        if per_key < 0 or per_ip < 0:
            raise ValueError("rate limits must be >= 0 requests per second")
        return cls(
            per_key=RateLimiter(rate=per_key, burst=burst, shared=shared) if per_key > 0 else None,
            per_ip=RateLimiter(rate=per_ip, burst=burst, shared=shared) if per_ip > 0 else None,
        )

    def take_spent(self) -> Spending | None:
        """What the shared limiters allowed since the previous call, or ``None`` for nothing."""
        per_key = {} if self.per_key is None else self.per_key.take_spent()
        per_ip = {} if self.per_ip is None else self.per_ip.take_spent()
        return Spending(per_key, per_ip) if per_key or per_ip else None

    def charge(self, spending: Spending, now: float) -> None:
        """Charge what other processes allowed to these limits."""
        if self.per_key is not None and spending.per_key:
            self.per_key.charge(spending.per_key, now)
        if self.per_ip is not None and spending.per_ip:
            self.per_ip.charge(spending.per_ip, now)

    def check_ip(self, address: str, now: float) -> None:
        """Take a token for a client address.

        :raises HTTPError: 429 ``rate_limit_exceeded`` with ``Retry-After``.
        """
        if self.per_ip is not None:
            _check(self.per_ip, address, now, "this address")

    def check_key(self, name: str, now: float) -> None:
        """Take a token for an API key name.

        :raises HTTPError: 429 ``rate_limit_exceeded`` with ``Retry-After``.
        """
        if self.per_key is not None:
            _check(self.per_key, name, now, "this API key")


def _check(limiter: RateLimiter, key: str, now: float, who: str) -> None:
    decision = limiter.check(key, now)
    if not decision.allowed:
        raise HTTPError(
            429,
            f"rate limit exceeded for {who} ({limiter.rate:g} requests/s); retry later",
            code="rate_limit_exceeded",
            headers=[("retry-after", retry_after_header(decision.retry_after))],
        )


# --- the hashing tool ----------------------------------------------------------------------

_USAGE = """\
usage: python -m inferno_proxy.auth hash [FILE]   print FILE (or stdin) with every key hashed
       python -m inferno_proxy.auth new NAME      make a random key: prints the key, then its line
"""


def main(argv: Sequence[str] | None = None) -> int:
    """The key tool (see the module docstring); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["hash"] and len(args) <= 2:
        try:
            if len(args) == 2:
                with open(args[1], encoding="utf-8") as file:
                    out = hashed_lines(file.readlines(), args[1])
            else:
                out = hashed_lines(sys.stdin.readlines(), "<stdin>")
        except (OSError, UnicodeDecodeError, ApiKeyFileError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        sys.stdout.write("".join(line + "\n" for line in out))
        return 0
    if args[:1] == ["new"] and len(args) == 2:
        name = args[1]
        if not _NAME.fullmatch(name):
            print(f"error: invalid key name {name!r} (letters, digits, _.@/+-)", file=sys.stderr)
            return 2
        key = "sk-" + secrets.token_urlsafe(NEW_KEY_BYTES)
        print(f"key (give it to the client; it is not stored): {key}")
        print(f"line for the key file: {name}:{hash_key(key)}")
        return 0
    sys.stderr.write(_USAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main())
