"""TOML in and out: key lines, value spelling, and the rendered effective configuration."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import tomlkit
from hypothesis import given
from hypothesis import strategies as st

from inferno._configtoml import find_redefinition, format_comment, format_value, scan_key_lines
from inferno.config import (
    REDACTED,
    Duration,
    FlagValue,
    ListOf,
    Section,
    Setting,
    Str,
    load_config,
    render_toml,
)

WriteToml = Callable[..., str]  # the write_toml fixture of conftest.py

TRICKY = """\
# a comment with port = 1
title = "x = 1 # not a comment"
[proxy]
port = 8080  # trailing [ bracket
backends = [
  "a:1",
  "fake = 1",
]
doc = \"\"\"
not = a key
\\\"\"\" still inside
\"\"\"
lit = '''
[not.a.table]
'''
"quoted.key" = 1
a . b = 2
[ "health" . limits ]
x = {y = 1, z = [1,
2]}
[[pool]]
w = 1
"""


def test_scan_finds_the_line_of_every_key() -> None:
    assert tomlkit.parse(TRICKY)  # the scanner only ever sees valid TOML
    assert scan_key_lines(TRICKY) == {
        ("title",): 2,
        ("proxy",): 3,
        ("proxy", "port"): 4,
        ("proxy", "backends"): 5,
        ("proxy", "doc"): 9,
        ("proxy", "lit"): 13,
        ("proxy", "quoted.key"): 16,
        ("proxy", "a"): 17,
        ("proxy", "a", "b"): 17,
        ("health",): 18,
        ("health", "limits"): 18,
        ("health", "limits", "x"): 19,
        ("pool",): 21,
        ("pool", "w"): 22,
    }


def test_scan_decodes_escaped_keys() -> None:
    text = '"t\\u00e9l\\"x" = 1\n\'lit\\\' = 2\n'
    assert tomlkit.parse(text).unwrap() == {'tél"x': 1, "lit\\": 2}
    assert scan_key_lines(text) == {('tél"x',): 1, ("lit\\",): 2}


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("[a]\nx = 1\nx = 2\n", 3),
        ("[a]\n[b]\n[a]\n", 3),
        ("[a]\nb.c = 1\n[a.b]\n", 3),
        ("[[x]]\na = 1\n[[x]]\na = 2\n", None),
        ("[a.b.c]\n[a]\n", None),
    ],
)
def test_find_redefinition(text: str, line: int | None) -> None:
    assert find_redefinition(text) == line


# --- writing values ----------------------------------------------------------

toml_scalars = (
    st.text()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.booleans()
)


@given(st.lists(toml_scalars, max_size=3) | toml_scalars)
def test_format_value_reads_back(value: object) -> None:
    text = f"v = {format_value(value)}  {format_comment('from somewhere')}\n"  # type: ignore[arg-type]
    parsed = tomlkit.parse(text).unwrap()["v"]
    if isinstance(value, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        return  # lone surrogates cannot be written as UTF-8; they become U+FFFD
    assert parsed == value


def test_format_value_replaces_lone_surrogates() -> None:
    spelled = format_value("a\udcff")
    assert tomlkit.parse(f"v = {spelled}").unwrap()["v"] == "a\ufffd"


@given(st.text())
def test_a_comment_cannot_inject_toml(text: str) -> None:
    document = f"{format_comment(text)}\nv = 1\n"
    assert tomlkit.parse(document).unwrap() == {"v": 1}


# --- rendering the effective configuration -----------------------------------


def test_render_round_trips_with_sources(
    sections: tuple[Section, ...], write_toml: WriteToml
) -> None:
    path = write_toml('[proxy]\ntimeout = "90s"\nbackends = ["a:1", "[::1]:2"]\n')
    config = load_config(
        sections,
        role="proxy",
        toml_path=path,
        environ={"INFERNO_PROXY_MAX_BODY_BYTES": "1MiB", "INFERNO_PROXY_SECRET": "hunter2"},
        flags={"proxy.tls": FlagValue("false", "--no-tls"), "health.interval": "250ms"},
    )
    text = render_toml(config)
    assert "hunter2" not in text

    data = tomlkit.parse(text).unwrap()
    assert data == {
        "proxy": {
            "port": 8080,
            "listen": "127.0.0.1:8080",
            "timeout": "90s",
            "max_body_bytes": "1MiB",
            "tls": False,
            "policy": "round_robin",
            "backends": ["a:1", "[::1]:2"],
        },
        "health": {"interval": "250ms", "failure_threshold": 3},
    }
    lines = text.splitlines()
    assert 'timeout = "90s"  # from ' + path + ":2" in lines
    assert 'backends = ["a:1", "[::1]:2"]  # from ' + path + ":3" in lines
    assert 'max_body_bytes = "1MiB"  # from env INFERNO_PROXY_MAX_BODY_BYTES' in lines
    assert "tls = false  # from flag --no-tls" in lines
    assert 'interval = "250ms"  # from flag --health-interval' in lines
    assert "port = 8080  # from default" in lines
    assert '# secret = "<redacted>"  # from env INFERNO_PROXY_SECRET' in lines

    # Feeding the output back as a file gives the same values (the secret aside).
    again = load_config(
        sections, role="proxy", toml_path=write_toml(text, "again.toml"), environ={}
    )
    assert {k: v for k, v in again.items() if k != "proxy.secret"} == {
        k: v for k, v in config.items() if k != "proxy.secret"
    }
    assert again["proxy.secret"] is None


def test_render_has_help_comments_and_a_table_per_section(sections: tuple[Section, ...]) -> None:
    text = render_toml(load_config(sections, role="proxy", environ={}))
    lines = text.splitlines()
    assert [line for line in lines if line.startswith("[")] == ["[proxy]", "[health]"]
    assert lines[lines.index("[proxy]") + 1] == "# The load balancer."
    assert lines[lines.index("port = 8080  # from default") - 1] == "# Port of the service."
    assert "# secret is unset  # from default" in lines
    assert lines[0] == "# Effective configuration of role 'proxy'."


def test_every_value_line_names_its_source(sections: tuple[Section, ...]) -> None:
    text = render_toml(load_config(sections, environ={"INFERNO_PROXY_SECRET": "s"}))
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            assert "  # from " in line, line
    assert text.count("# from ") == sum(len(s.settings) for s in sections)


def test_secrets_never_leak_in_any_form() -> None:
    section = Section(
        "vault",
        (
            Setting("token", Str(), "default-token", "API token.", secret=True),
            Setting("keys", ListOf(Str()), (), "Signing keys.", secret=True),
            Setting("ttl", Duration(), 60.0, "Token lifetime."),
        ),
    )
    config = load_config([section], environ={"INFERNO_VAULT_KEYS": "k-one,k-two"})
    text = render_toml(config)
    for secret in ("default-token", "k-one", "k-two"):
        assert secret not in text
        assert secret not in repr(config)
    assert text.count(REDACTED) == 2
    assert tomlkit.parse(text).unwrap() == {"vault": {"ttl": "1m"}}


def test_hostile_help_and_paths_stay_comments(write_toml: WriteToml) -> None:
    section = Section(
        "s",
        (Setting("name", Str(), "x", 'Line one.\nevil = "injected"'),),
        help="Section help\n[evil]",
    )
    path = write_toml('[s]\nname = "y"\n', "odd\nname.toml")
    text = render_toml(load_config([section], toml_path=path, environ={}))
    assert tomlkit.parse(text).unwrap() == {"s": {"name": "y"}}


def test_importing_config_does_not_import_tomlkit() -> None:
    code = "import sys, inferno.config; print('tomlkit' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
