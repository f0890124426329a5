"""A third-party role in a real process: SIGTERM/SIGINT, a second signal, the deadline, SIGHUP."""

from __future__ import annotations

import json
import signal
import socket

import pytest

WAIT_S = 30.0


def greeting_from(line: str) -> bytes:
    """Connect to the port a ``hello: listening on HOST:PORT`` line names; return what it says."""
    host, _, port = line.rsplit(" ", 1)[1].rpartition(":")
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as sock:
        sock.settimeout(WAIT_S)
        return sock.makefile("rb").readline()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_stops_the_role_gracefully_with_status_0(
    start_role, signum: signal.Signals
) -> None:
    role = start_role("hello", "--greeting", "bonjour")
    assert role.expect("hello-plugin: startup") == "hello-plugin: startup hello"
    listening = role.expect("hello: listening on 127.0.0.1:")
    assert greeting_from(listening) == b"bonjour\n"
    role.send(signum)
    role.expect("hello: stopping")
    role.expect("hello: stopped")
    role.expect("hello-plugin: shutdown hello")
    assert role.wait() == 0, role.output()


def test_logs_are_json_lines_with_the_signal_and_the_role(start_role) -> None:
    role = start_role("hello")
    role.expect("hello: listening")
    role.send(signal.SIGTERM)
    assert role.wait() == 0, role.output()
    records = [json.loads(line) for line in role.stderr]
    messages = [r["message"] for r in records]
    assert "starting role hello" in messages
    assert "SIGTERM received: stopping (deadline 30.0s)" in messages
    assert "role hello stopped" in messages
    for record in records:
        assert {"ts", "level", "logger", "message"} <= record.keys()
    (start,) = [r for r in records if r["message"] == "starting role hello"]
    assert start["role"] == "hello"
    assert start["level"] == "info"
    assert start["logger"] == "inferno.lifecycle"


@pytest.mark.parametrize(
    ("second", "status"), [(signal.SIGTERM, 128 + 15), (signal.SIGINT, 128 + 2)]
)
def test_a_second_signal_exits_at_once(start_role, second: signal.Signals, status: int) -> None:
    role = start_role("hello", "--stubborn")
    role.expect("hello: listening")
    role.send(signal.SIGTERM)
    role.expect("hello: ignoring the stop request")
    role.send(second)
    assert role.wait() == status, role.output()
    assert "hello-plugin: shutdown hello" not in role.stdout  # no waiting for anything
    assert any(f"second {second.name} received: exiting now" in line for line in role.stderr)


def test_a_role_that_overruns_the_deadline_is_cancelled_and_exits_1(start_role) -> None:
    role = start_role("hello", "--stubborn", "--runtime-shutdown-timeout", "200ms")
    role.expect("hello: listening")
    role.send(signal.SIGTERM)
    role.expect("hello: ignoring the stop request")
    role.expect("hello-plugin: shutdown hello")  # shutdown hooks still run
    assert role.wait() == 1, role.output()
    assert any("did not stop within 0.2s" in line for line in role.stderr)


def test_sighup_calls_the_reload_hook_then_the_roles_callbacks(start_role) -> None:
    role = start_role("hello")
    listening = role.expect("hello: listening")
    role.send(signal.SIGHUP)
    assert role.expect("hello-plugin: reload") == "hello-plugin: reload hook hello"
    role.expect("hello: reloaded")
    assert greeting_from(listening) == b"hello\n"  # still serving
    role.send(signal.SIGHUP)
    role.expect("hello-plugin: reload hook hello")
    role.expect("hello: reloaded")
    role.send(signal.SIGTERM)
    assert role.wait() == 0, role.output()
