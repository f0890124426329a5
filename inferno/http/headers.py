"""The header multi-map shared by Inferno's HTTP server and client.

h11 hands us header fields as ``(name, value)`` byte pairs with lower-cased
names, in wire order, repeated names kept.  :class:`Headers` is an immutable,
case-insensitive view over exactly that list: it keeps the bytes (so a proxy can
forward them untouched) and decodes to ``str`` only on access.  Values decode
as ISO-8859-1, which maps every byte to one code point, so no input can make a
lookup fail (RFC 9110 §5.5: field values are octets; non-ASCII ones are opaque
"obs-text", not UTF-8).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import overload

__all__ = ["Headers"]


def _name_key(name: str | bytes) -> bytes:
    """The lower-cased byte form used for matching (h11 lower-cases names it parses)."""
    if isinstance(name, str):
        return name.lower().encode("latin-1")
    return name.lower()


class Headers:
    """An immutable, case-insensitive multi-map over ``(name, value)`` byte pairs.

    ``raw`` keeps the pairs as given (wire order, repeats kept).  Lookups accept
    ``str`` or ``bytes`` names in any case.  Iterating yields ``(name, value)``
    pairs as ``str``, like :meth:`items`.
    """

    __slots__ = ("_raw",)

    def __init__(self, raw: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self._raw: list[tuple[bytes, bytes]] = raw if type(raw) is list else list(raw)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str | bytes, str | bytes]]) -> Headers:
        """Build from ``str`` or ``bytes`` pairs (names lower-cased, like h11 does)."""
        raw = []
        for name, value in pairs:
            raw.append(
                (
                    _name_key(name),
                    value.encode("latin-1") if isinstance(value, str) else bytes(value),
                )
            )
        return cls(raw)

    @property
    def raw(self) -> list[tuple[bytes, bytes]]:
        """The pairs as received: lower-cased byte names, byte values, wire order."""
        return self._raw

    @overload
    def get(self, name: str | bytes) -> str | None: ...

    @overload
    def get(self, name: str | bytes, default: str) -> str: ...

    def get(self, name: str | bytes, default: str | None = None) -> str | None:
        """The field's value; repeated fields are joined with ``", "`` (RFC 9110 §5.3).

        Use :meth:`get_all` for ``Set-Cookie``, whose values may contain commas.
        """
        key = _name_key(name)
        found: bytes | None = None
        many: list[bytes] | None = None
        for field, value in self._raw:
            if field == key:
                if found is None:
                    found = value
                elif many is None:
                    many = [found, value]
                else:
                    many.append(value)
        if found is None:
            return default
        if many is not None:
            return b", ".join(many).decode("latin-1")
        return found.decode("latin-1")

    def get_all(self, name: str | bytes) -> list[str]:
        """Every value of the field, in wire order (empty when absent)."""
        key = _name_key(name)
        return [value.decode("latin-1") for field, value in self._raw if field == key]

    def items(self) -> list[tuple[str, str]]:
        """Every ``(name, value)`` pair decoded, in wire order."""
        return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in self._raw]

    def has_token(self, name: str | bytes, token: str) -> bool:
        """Whether the comma-separated field contains ``token`` (case-insensitive).

        For list-valued fields such as ``Connection`` and ``Upgrade`` (RFC 9110 §5.6.1).
        """
        wanted = token.lower().encode("latin-1")
        key = _name_key(name)
        for field, value in self._raw:
            if field == key:
                for part in value.split(b","):
                    if part.strip().lower() == wanted:
                        return True
        return False

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, (str, bytes)):
            return False
        key = _name_key(name)
        return any(field == key for field, _ in self._raw)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.items())

    def __len__(self) -> int:
        return len(self._raw)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return self._raw == other._raw
        return NotImplemented

    def __repr__(self) -> str:
        return f"Headers({self.items()!r})"
