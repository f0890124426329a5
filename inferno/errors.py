"""Inferno's exception hierarchy, grouped by what a caller does about each.

Every error knows whether it is *temporary* (the same operation may succeed
on retry, perhaps against another node) or *permanent* (retrying is pointless),
and errors that surface to an HTTP client know their status and the OpenAI
error shape (``{"error": {"message", "type", "code"}}``) that OpenAI clients
display well.  Lower layers translate foreign exceptions (``OSError``,
``h11.ProtocolError``, ``anyio`` errors) into these with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import Any, TypeVar

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "HTTPError",
    "InfernoError",
    "ListenError",
    "PluginError",
    "ValidationError",
    "error_body",
    "find_exception",
]

E = TypeVar("E", bound=BaseException)


def error_body(message: str, type_: str, code: str | int | None) -> dict[str, Any]:
    """Return the OpenAI-shaped error document used by every Inferno endpoint."""
    return {"error": {"message": message, "type": type_, "code": code}}


class InfernoError(Exception):
    """Base of every error Inferno raises on purpose.

    ``temporary`` tells a caller whether retrying (maybe elsewhere) can help.
    """

    temporary: bool = False


class HTTPError(InfernoError):
    """Raised when a request must be answered with an HTTP error status.

    Handlers raise it; the server turns it into a JSON error response with the
    OpenAI error shape.  ``headers`` are added to that response (for example
    ``Retry-After`` with 429 and 503).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str | None = None,
        code: str | int | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or _default_type(status)
        self.code = code
        self.headers = headers or []
        self.temporary = status in (408, 429, 502, 503, 504)

    def body(self) -> dict[str, Any]:
        """The JSON document sent to the client."""
        return error_body(self.message, self.type, self.code)


def _default_type(status: int) -> str:
    if status in (401, 403):
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


class ValidationError(InfernoError, ValueError):
    """Raised when a wire document has a missing or wrongly typed field.

    ``field`` is the dotted path of the offending field (``"models[2]"``),
    so an HTTP layer can answer 400 naming it.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def to_http(self) -> HTTPError:
        """The 400 answer naming the field."""
        return HTTPError(400, str(self), code="invalid_field")


class ConfigProblem:
    """One problem with one configuration value: key, where it came from, what is wrong."""

    __slots__ = ("allowed", "key", "problem", "source")

    def __init__(self, key: str, source: str, problem: str, allowed: str = "") -> None:
        self.key = key
        self.source = source
        self.problem = problem
        self.allowed = allowed

    def __str__(self) -> str:
        line = f"{self.key} ({self.source}): {self.problem}"
        if self.allowed:
            line += f"; allowed: {self.allowed}"
        return line

    def __repr__(self) -> str:
        return f"ConfigProblem({str(self)!r})"


class ConfigError(InfernoError):
    """Raised when configuration is invalid; the CLI prints one line per problem and exits 2."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


class PluginError(InfernoError):
    """Raised when a plugin misbehaves in a way the caller must hear about.

    For example two plugins offering the same engine name.
    """


class ListenError(InfernoError):
    """Raised when a server cannot bind its address (in use, not permitted, no such address).

    Its message names the address and the setting that chose it, so the
    command line prints it as one line (exit status 1) instead of a traceback.
    """


def find_exception(exc: BaseException, kind: type[E]) -> E | None:
    """``exc`` itself, or the first exception of ``kind`` inside (nested) exception groups.

    Task groups wrap what their tasks raise; a role uses this to turn the one
    expected error inside such a group back into its one-line answer.
    """
    if isinstance(exc, kind):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = find_exception(inner, kind)
        if found is not None:
            return found
    return None
