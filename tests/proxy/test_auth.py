"""Client access: API key files (plain and hashed), the hashing tool, rate limits."""

from __future__ import annotations

import hashlib
import io
import pathlib

import openai
import pytest
from inferno_proxy.auth import (
    ApiKeyFileError,
    ApiKeys,
    RateLimits,
    hash_key,
    hashed_lines,
    main,
)
from inferno_proxy.forward import ForwardSettings

from inferno.errors import HTTPError
from tests.proxy.upstreams import Backend, echo, proxied

PLAIN = "sk-plain-0123456789"
HASHED = "sk-hashed-9876543210"
NEVER = 0.0001  # requests per second: a bucket that does not refill within a test

# --- the key file -----------------------------------------------------------------------------


def key_file(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "keys.txt"
    path.write_text(
        "# client keys\n"
        "\n"
        f"{PLAIN}\n"
        f"team-b:{hash_key(HASHED)}\n"
        f"team-c:sk-other\n"
        f"{hash_key('sk-anon')}\n"
    )
    return path


def test_plain_and_hashed_keys_are_accepted(tmp_path: pathlib.Path) -> None:
    keys = ApiKeys.from_file(key_file(tmp_path))
    assert len(keys) == 4
    assert keys.identify(f"Bearer {HASHED}") == "team-b"
    assert keys.identify(f"bearer   {HASHED} ") == "team-b"  # scheme is case-insensitive
    assert keys.identify("Bearer sk-other") == "team-c"
    plain_name = keys.identify(f"Bearer {PLAIN}")
    digest = hashlib.sha256(PLAIN.encode()).hexdigest()
    assert plain_name == f"key-{digest[:12]}"  # unnamed: named after its digest
    assert keys.identify("Bearer sk-anon") is not None


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", f"Basic {PLAIN}", "Bearer sk-wrong", "Bearer " + "x" * 5000],
)
def test_anything_else_is_refused_with_401(
    tmp_path: pathlib.Path, authorization: str | None
) -> None:
    keys = ApiKeys.from_file(key_file(tmp_path))
    assert keys.identify(authorization) is None
    with pytest.raises(HTTPError) as caught:
        keys.require(authorization)
    assert caught.value.status == 401
    assert caught.value.code == "invalid_api_key"
    assert ("www-authenticate", "Bearer") in caught.value.headers


def test_the_file_holds_no_plain_key_once_hashed() -> None:
    lines = ["# keys", f"a:{PLAIN}", HASHED, f"b:{hash_key('sk-x')}", ""]
    hashed = hashed_lines(lines)
    assert hashed[0] == "# keys"
    assert hashed[1] == f"a:{hash_key(PLAIN)}"
    assert hashed[2] == hash_key(HASHED)
    assert hashed[3] == f"b:{hash_key('sk-x')}"  # already hashed: unchanged
    assert PLAIN not in "\n".join(hashed)
    # Both forms accept the same keys.
    before, after = ApiKeys.from_lines(lines), ApiKeys.from_lines(hashed)
    for key in (PLAIN, HASHED, "sk-x"):
        assert before.identify(f"Bearer {key}") == after.identify(f"Bearer {key}") is not None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("sha256:abc\n", "64 hex digits"),
        ("bad name:sk-1\n", "white space"),
        ("a:sk-1\nb:sk-1\n", "another name"),
        ("# only a comment\n", "no API key"),
        ("x:sha256:" + "g" * 64 + "\n", "64 hex digits"),
    ],
)
def test_bad_key_files_name_the_line(tmp_path: pathlib.Path, text: str, problem: str) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(text)
    with pytest.raises(ApiKeyFileError, match=problem) as caught:
        ApiKeys.from_file(path)
    assert str(path) in str(caught.value)


def test_a_missing_file_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ApiKeyFileError, match="cannot read API keys"):
        ApiKeys.from_file(tmp_path / "absent")


def test_the_tool_hashes_a_file_and_makes_new_keys(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = key_file(tmp_path)
    assert main(["hash", str(path)]) == 0
    out = capsys.readouterr().out
    assert PLAIN not in out
    assert hash_key(PLAIN) in out
    hashed = tmp_path / "hashed.txt"
    hashed.write_text(out)
    assert ApiKeys.from_file(hashed).identify(f"Bearer {PLAIN}") is not None

    monkeypatch.setattr("sys.stdin", io.StringIO("name:sk-from-stdin\n"))
    assert main(["hash"]) == 0
    assert capsys.readouterr().out == f"name:{hash_key('sk-from-stdin')}\n"

    assert main(["new", "team-z"]) == 0
    out = capsys.readouterr().out
    key = out.split("it is not stored): ")[1].split()[0]
    line = out.split("line for the key file: ")[1].strip()
    assert ApiKeys.from_lines([line]).identify(f"Bearer {key}") == "team-z"

    assert main(["hash", str(tmp_path / "absent")]) == 1
    assert main(["frobnicate"]) == 2
    assert main(["new", "bad name"]) == 2
    capsys.readouterr()


# --- rate limits --------------------------------------------------------------------------


def test_rate_limits_answer_429_with_retry_after() -> None:
    limits = RateLimits.build(per_key=NEVER, per_ip=NEVER, burst=1)
    limits.check_ip("10.0.0.1", 0.0)
    limits.check_ip("10.0.0.2", 0.0)  # another address has its own bucket
    with pytest.raises(HTTPError) as caught:
        limits.check_ip("10.0.0.1", 0.0)
    assert caught.value.status == 429
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.headers[0][0] == "retry-after"
    assert int(caught.value.headers[0][1]) > 1
    limits.check_key("a", 0.0)
    with pytest.raises(HTTPError):
        limits.check_key("a", 0.0)


def test_no_limit_when_the_rate_is_zero() -> None:
    limits = RateLimits.build()
    assert limits.per_key is None
    assert limits.per_ip is None
    for _ in range(1000):
        limits.check_ip("10.0.0.1", 0.0)
        limits.check_key("a", 0.0)
    with pytest.raises(ValueError, match=">= 0"):
        RateLimits.build(per_ip=-1.0)


# --- behind the proxy ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_proxy_wants_a_valid_key_and_hides_it_from_nodes(
    tmp_path: pathlib.Path,
) -> None:
    node = Backend("a", echo, models=("m",))
    async with proxied(node, api_keys=ApiKeys.from_file(key_file(tmp_path))) as h:
        missing = await h.client.request("GET", f"{h.url}/v1/models")
        assert missing.status == 401
        assert (await missing.json())["error"]["code"] == "invalid_api_key"
        assert missing.headers.get("www-authenticate") == "Bearer"
        wrong = await h.client.request(
            "GET", f"{h.url}/v1/x", headers={"authorization": "Bearer sk-wrong"}
        )
        assert wrong.status == 401
        assert node.seen == []
        for key in (PLAIN, HASHED):
            ok = await h.client.request(
                "GET", f"{h.url}/v1/x", headers={"authorization": f"Bearer {key}"}
            )
            assert ok.status == 200
        assert all("authorization" not in seen.headers for seen in node.seen)

        denied = openai.AsyncOpenAI(base_url=f"{h.url}/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await denied.models.list()
        await denied.close()
        allowed = openai.AsyncOpenAI(base_url=f"{h.url}/v1", api_key=HASHED, max_retries=0)
        assert [m.id async for m in allowed.models.list()] == ["m"]
        await allowed.close()


@pytest.mark.anyio
async def test_the_proxy_limits_each_key_and_each_address(tmp_path: pathlib.Path) -> None:
    node = Backend("a", echo)
    keys = ApiKeys.from_file(key_file(tmp_path))
    async with proxied(
        node, api_keys=keys, rate_limits=RateLimits.build(per_key=NEVER, burst=2)
    ) as h:
        plain = {"authorization": f"Bearer {PLAIN}"}
        codes = [(await h.client.request("GET", f"{h.url}/v1/x", headers=plain)).status]
        codes.append((await h.client.request("GET", f"{h.url}/v1/x", headers=plain)).status)
        third = await h.client.request("GET", f"{h.url}/v1/x", headers=plain)
        assert codes == [200, 200]
        assert third.status == 429
        assert int(third.headers.get("retry-after", "0")) >= 1
        assert (await third.json())["error"]["code"] == "rate_limit_exceeded"
        other = {"authorization": f"Bearer {HASHED}"}  # another key: its own bucket
        assert (await h.client.request("GET", f"{h.url}/v1/x", headers=other)).status == 200
        assert len(node.seen) == 3

    node = Backend("b", echo)
    settings = ForwardSettings(trust_forwarded_headers=True)
    async with proxied(
        node, settings=settings, rate_limits=RateLimits.build(per_ip=NEVER, burst=1)
    ) as h:
        first = {"x-forwarded-for": "192.0.2.1"}
        second = {"x-forwarded-for": "192.0.2.2"}
        assert (await h.client.request("GET", f"{h.url}/v1/x", headers=first)).status == 200
        assert (await h.client.request("GET", f"{h.url}/v1/x", headers=second)).status == 200
        limited = await h.client.request("GET", f"{h.url}/v1/x", headers=first)
        assert limited.status == 429
        assert limited.headers.get("retry-after") is not None
