"""Simulator profiles: what one serving replica of a model on some hardware can do.

A profile is a small TOML file describing the cost model of the ``sim``
engine (:mod:`inferno_backend.engines.simmodel`) for one model on one kind of
machine.  The same files double as capacity estimates for the governator, so
there is exactly one format, documented here and validated by
:func:`parse_profile`::

    [profile]
    format = 1                         # bump when the meaning of a key changes
    name = "h100-llama3-8b"            # optional; defaults to the file's stem
    description = "one line for humans"
    model = "meta-llama/Meta-Llama-3-8B-Instruct"   # model name served by default
    hardware = "1x NVIDIA H100 SXM 80GB"
    synthetic = false                  # true: made-up numbers, no source needed
    source = "where the numbers come from"          # required unless synthetic

    [batching]
    max_num_seqs = 256                 # sequences in one batch (vLLM --max-num-seqs)
    max_num_batched_tokens = 8192      # tokens per scheduler step (chunked prefill budget)
    max_model_len = 8192               # prompt + completion limit per sequence

    [kv_cache]
    kv_cache_tokens = 430000           # tokens of KV cache on the device
    block_size = 16                    # tokens per KV block (vLLM's paging unit)

    [timing]
    prefill_tokens_per_second = 30000  # prompt tokens processed per second
    decode_base_ms = 6.0               # fixed cost of every forward step
    decode_per_seq_ms = 0.03           # added per decoding sequence in the step
    decode_per_1k_kv_tokens_ms = 0.04  # added per 1,000 tokens of context read

    [price]                            # optional hint; the pricing catalog rules
    usd_per_hour = 2.5
    source = "where the price comes from"

One engine step costs (see :meth:`SimProfile.step_seconds`)::

    decode_base_ms + decode_per_seq_ms * decoding_sequences
        + decode_per_1k_kv_tokens_ms * context_tokens_of_decoding_sequences / 1000
        + 1000 * prefill_tokens / prefill_tokens_per_second          (milliseconds)

Shipped profiles live next to this module and are read with
:mod:`importlib.resources`, so they load from a wheel, a zip or a pex alike.
Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from inferno.errors import InfernoError

__all__ = [
    "DEFAULT_PROFILE",
    "FORMAT_VERSION",
    "ProfileError",
    "SimProfile",
    "load_profile",
    "load_profile_file",
    "parse_profile",
    "profile_names",
]

#: The profile used when none is named: small and fast, so tests and a laptop
#: ``inferno up`` answer at once.
DEFAULT_PROFILE = "cpu-tiny"
#: The only ``profile.format`` this loader understands.
FORMAT_VERSION = 1
_SUFFIX = ".toml"


class ProfileError(InfernoError, ValueError):
    """Raised when a profile cannot be found, read or validated.

    The message names the file (``origin``) and, where one is at fault, the
    dotted key, so an operator can fix the file without reading code.
    """

    def __init__(self, origin: str, problem: str, key: str | None = None) -> None:
        where = f"{origin}: {key}" if key else origin
        super().__init__(f"{where}: {problem}")
        self.origin = origin
        self.key = key
        self.problem = problem


@dataclass(frozen=True, slots=True)
class SimProfile:
    """One model on one kind of machine, as the simulator and the governator see it."""

    name: str
    model: str
    hardware: str
    prefill_tokens_per_second: float
    decode_base_ms: float
    decode_per_seq_ms: float
    decode_per_1k_kv_tokens_ms: float
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_tokens: int
    block_size: int
    max_model_len: int
    description: str = ""
    synthetic: bool = False
    source: str | None = None
    usd_per_hour: float | None = None
    price_source: str | None = None
    #: Where the profile was read from (a path, or ``<name>.toml (shipped)``).
    origin: str = ""

    @property
    def kv_cache_blocks(self) -> int:
        """KV blocks on the device; a partly filled block still holds a whole block."""
        return self.kv_cache_tokens // self.block_size

    def step_seconds(self, prefill_tokens: int, decode_seqs: int, decode_kv_tokens: int) -> float:
        """Duration in seconds of one engine step.

        :param prefill_tokens: prompt (or recomputed) tokens processed in the step.
        :param decode_seqs: sequences producing their next token from a cached context.
        :param decode_kv_tokens: context tokens those decoding sequences attend to.
        """
        ms = (
            self.decode_base_ms
            + self.decode_per_seq_ms * decode_seqs
            + self.decode_per_1k_kv_tokens_ms * decode_kv_tokens / 1000.0
        )
        return ms / 1000.0 + prefill_tokens / self.prefill_tokens_per_second

    def decode_tokens_per_second(self, batch: int, context_tokens: int) -> float:
        """Steady-state generation rate with ``batch`` sequences of ``context_tokens`` each.

        A capacity estimate (what the governator plans with), not a measurement.
        """
        batch = max(1, min(batch, self.max_num_seqs))
        return batch / self.step_seconds(0, batch, batch * context_tokens)


# (section, key) -> (kind, required).  Kinds: "str", "bool", "int+", "float+", "float0".
_SCHEMA: dict[str, dict[str, tuple[str, bool]]] = {
    "profile": {
        "format": ("int+", True),
        "name": ("str", False),
        "description": ("str", False),
        "model": ("str", True),
        "hardware": ("str", True),
        "synthetic": ("bool", False),
        "source": ("str", False),
    },
    "batching": {
        "max_num_seqs": ("int+", True),
        "max_num_batched_tokens": ("int+", True),
        "max_model_len": ("int+", True),
    },
    "kv_cache": {
        "kv_cache_tokens": ("int+", True),
        "block_size": ("int+", True),
    },
    "timing": {
        "prefill_tokens_per_second": ("float+", True),
        "decode_base_ms": ("float0", True),
        "decode_per_seq_ms": ("float0", True),
        "decode_per_1k_kv_tokens_ms": ("float0", True),
    },
    "price": {
        "usd_per_hour": ("float0", False),
        "source": ("str", False),
    },
}
_REQUIRED_SECTIONS = ("profile", "batching", "kv_cache", "timing")
_KIND_TEXT = {
    "str": "a non-empty string",
    "bool": "true or false",
    "int+": "an integer > 0",
    "float+": "a number > 0",
    "float0": "a number >= 0",
}


def _check_value(origin: str, key: str, kind: str, value: object) -> object:
    """Return ``value`` if it is of ``kind``; raise naming ``key`` otherwise."""
    ok: bool
    if kind == "str":
        ok = isinstance(value, str) and value.strip() != ""
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        ok = False  # TOML true is not a number, whatever Python thinks
    elif kind == "int+":
        ok = isinstance(value, int) and value > 0
    else:
        ok = math.isfinite(value) and (value > 0 if kind == "float+" else value >= 0)
    if not ok:
        raise ProfileError(origin, f"must be {_KIND_TEXT[kind]}, got {value!r}", key)
    return float(value) if kind.startswith("float") else value  # type: ignore[arg-type]


def _flatten(origin: str, data: Mapping[str, Any]) -> dict[str, object]:
    """Check sections and keys against the schema; return ``{key: value}`` (keys are unique)."""
    values: dict[str, object] = {}
    for section in data:
        if section not in _SCHEMA:
            known = ", ".join(f"[{s}]" for s in _SCHEMA)
            raise ProfileError(origin, f"unknown section (known: {known})", section)
        if not isinstance(data[section], Mapping):
            raise ProfileError(origin, "must be a table", section)
    for section in _REQUIRED_SECTIONS:
        if section not in data:
            raise ProfileError(origin, "missing section", f"[{section}]")
    for section, keys in _SCHEMA.items():
        table: Mapping[str, Any] = data.get(section, {})
        for key in table:
            if key not in keys:
                known = ", ".join(keys)
                raise ProfileError(origin, f"unknown key (known: {known})", f"{section}.{key}")
        for key, (kind, required) in keys.items():
            dotted = f"{section}.{key}"
            if key in table:
                name = "price_source" if dotted == "price.source" else key
                values[name] = _check_value(origin, dotted, kind, table[key])
            elif required:
                raise ProfileError(origin, f"missing (expected {_KIND_TEXT[kind]})", dotted)
    return values


def parse_profile(text: str, origin: str, default_name: str) -> SimProfile:
    """Parse and validate the TOML ``text`` of a profile.

    :param origin: how error messages name the file.
    :param default_name: the profile name when ``profile.name`` is absent.
    :raises ProfileError: naming ``origin`` and the offending key.
    """
    import tomlkit  # deferred: only a backend that loads a profile pays for it
    from tomlkit.exceptions import TOMLKitError

    try:
        data: dict[str, Any] = tomlkit.parse(text).unwrap()
    except TOMLKitError as exc:
        raise ProfileError(origin, f"not valid TOML: {exc}") from exc
    values = _flatten(origin, data)
    if values.pop("format") != FORMAT_VERSION:
        problem = f"unsupported format (this loader reads {FORMAT_VERSION})"
        raise ProfileError(origin, problem, "profile.format")
    values.setdefault("name", default_name)
    if not values.get("synthetic", False) and "source" not in values:
        problem = "say where the numbers come from, or set profile.synthetic = true"
        raise ProfileError(origin, problem, "profile.source")
    profile = SimProfile(origin=origin, **values)  # type: ignore[arg-type]
    if profile.block_size > profile.max_num_batched_tokens:
        problem = "must not exceed batching.max_num_batched_tokens"
        raise ProfileError(origin, problem, "kv_cache.block_size")
    if profile.kv_cache_blocks * profile.block_size < profile.max_model_len:
        # As vLLM refuses to start: one sequence of max_model_len must fit in the
        # cache, or it could be preempted forever.
        raise ProfileError(
            origin,
            f"the KV cache ({profile.kv_cache_tokens} tokens) cannot hold one sequence of "
            f"batching.max_model_len = {profile.max_model_len} tokens",
            "kv_cache.kv_cache_tokens",
        )
    return profile


def load_profile_file(path: str | os.PathLike[str]) -> SimProfile:
    """Load a profile from a file path (its stem is the default name).

    :raises ProfileError: when the file cannot be read or is invalid.
    """
    origin = os.fspath(path)
    try:
        with open(origin, encoding="utf-8") as stream:
            text = stream.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(origin, f"cannot read the profile: {exc}") from exc
    stem = os.path.basename(origin)
    stem = stem[: -len(_SUFFIX)] if stem.endswith(_SUFFIX) else stem
    return parse_profile(text, origin, stem)


def profile_names() -> list[str]:
    """Names of the profiles shipped with Inferno, sorted."""
    package = resources.files(__name__)
    return sorted(
        entry.name[: -len(_SUFFIX)] for entry in package.iterdir() if entry.name.endswith(_SUFFIX)
    )


def load_profile(spec: str | os.PathLike[str] | None = None) -> SimProfile:
    """Load a profile by shipped name (``"h100-llama3-8b"``) or by path.

    ``None`` or ``""`` loads :data:`DEFAULT_PROFILE`.  A spec containing a path
    separator or ending in ``.toml`` is read as a file.

    :raises ProfileError: for an unknown name (listing the known ones) or an
        invalid file.
    """
    if spec is None or spec == "":
        spec = DEFAULT_PROFILE
    text_spec = os.fspath(spec)
    looks_like_path = "/" in text_spec or os.sep in text_spec or text_spec.endswith(_SUFFIX)
    if isinstance(spec, os.PathLike) or looks_like_path:
        return load_profile_file(text_spec)
    resource = resources.files(__name__).joinpath(text_spec + _SUFFIX)
    origin = f"{text_spec}{_SUFFIX} (shipped profile)"
    if not resource.is_file():
        known = ", ".join(profile_names())
        raise ProfileError(text_spec, f"no such profile (shipped: {known}; or give a .toml path)")
    return parse_profile(resource.read_text(encoding="utf-8"), origin, text_spec)
