"""Simulator profiles: the shipped ones load, bad ones are refused naming file and key."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import zipfile

import inferno_backend
import pytest
from inferno_backend.profiles import (
    DEFAULT_PROFILE,
    ProfileError,
    SimProfile,
    load_profile,
    load_profile_file,
    profile_names,
)

GOOD = """\
[profile]
format = 1
model = "m"
hardware = "h"
source = "a benchmark"

[batching]
max_num_seqs = 8
max_num_batched_tokens = 512
max_model_len = 1024

[kv_cache]
kv_cache_tokens = 4096
block_size = 16

[timing]
prefill_tokens_per_second = 1000
decode_base_ms = 10
decode_per_seq_ms = 1.5
decode_per_1k_kv_tokens_ms = 0
"""


def test_shipped_profiles_load_and_say_where_their_numbers_come_from() -> None:
    names = profile_names()
    assert {"cpu-tiny", "h100-llama3-8b", "a10g-llama3-8b"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert profile.name == name
        assert profile.synthetic or (profile.source and len(profile.source) > 40), name
        assert profile.kv_cache_tokens >= profile.max_model_len
        assert profile.model
        assert profile.hardware
        # A capacity estimate the governator can use: a full batch is faster than one sequence.
        assert profile.decode_tokens_per_second(profile.max_num_seqs, 1000) > (
            profile.decode_tokens_per_second(1, 1000)
        )


def test_default_profile_is_small_fast_and_synthetic() -> None:
    profile = load_profile()
    assert profile.name == DEFAULT_PROFILE == "cpu-tiny"
    assert profile.synthetic
    assert load_profile("") == profile
    assert profile.step_seconds(0, 1, 0) < 0.01


def test_a_profile_loads_from_a_path(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(GOOD)
    for spec in (path, str(path)):
        profile = load_profile(spec)
        assert profile.name == "mine"
        assert profile.origin == str(path)
        assert profile.decode_per_1k_kv_tokens_ms == 0.0
        assert isinstance(profile.decode_base_ms, float)
        assert profile.kv_cache_blocks == 256
    assert load_profile_file(path) == load_profile(path)


def test_step_cost_formula() -> None:
    profile = SimProfile(
        name="p", model="m", hardware="h", prefill_tokens_per_second=1000.0,
        decode_base_ms=10.0, decode_per_seq_ms=1.0, decode_per_1k_kv_tokens_ms=2.0,
        max_num_seqs=8, max_num_batched_tokens=512, kv_cache_tokens=4096, block_size=16,
        max_model_len=1024, synthetic=True,
    )  # fmt: skip
    # 10 ms + 3 x 1 ms + 2 ms x 1.5 (1,500 context tokens) + 100 prefill tokens at 1,000/s
    assert profile.step_seconds(100, 3, 1500) == pytest.approx(0.010 + 0.003 + 0.003 + 0.1)


@pytest.mark.parametrize(
    ("old", "new", "key", "problem"),
    [
        ("decode_base_ms = 10", "decode_base_ms = -1", "timing.decode_base_ms", ">= 0"),
        ("decode_base_ms = 10", "decode_base_ms = 'x'", "timing.decode_base_ms", "number"),
        ("max_num_seqs = 8", "max_num_seqs = true", "batching.max_num_seqs", "integer"),
        ("max_num_seqs = 8", "max_num_seqs = 8.5", "batching.max_num_seqs", "integer"),
        ("max_num_seqs = 8", "", "batching.max_num_seqs", "missing"),
        ("max_num_seqs = 8", "max_num_seq = 8", "batching.max_num_seq", "unknown key"),
        ("[timing]", "[timings]", "timings", "unknown section"),
        ('source = "a benchmark"', "", "profile.source", "synthetic"),
        ("format = 1", "format = 2", "profile.format", "unsupported"),
        ("kv_cache_tokens = 4096", "kv_cache_tokens = 512", "kv_cache.kv_cache_tokens", "cannot"),
        ("block_size = 16", "block_size = 1024", "kv_cache.block_size", "must not exceed"),
        ("prefill_tokens_per_second = 1000", "prefill_tokens_per_second = 0", "timing.", "> 0"),
        ('hardware = "h"', 'hardware = ""', "profile.hardware", "non-empty"),
    ],
)  # fmt: skip
def test_a_bad_profile_is_refused_naming_file_and_key(
    tmp_path: pathlib.Path, old: str, new: str, key: str, problem: str
) -> None:
    assert old in GOOD
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace(old, new))
    with pytest.raises(ProfileError) as caught:
        load_profile(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}: {key}")
    assert problem in message


def test_missing_section_not_toml_and_unreadable_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(GOOD.split("[timing]")[0])
    with pytest.raises(ProfileError, match=r"p\.toml: \[timing\]: missing section"):
        load_profile(path)
    path.write_text("[profile\nformat = 1")
    with pytest.raises(ProfileError, match=r"p\.toml: not valid TOML"):
        load_profile(path)
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "absent.toml")


def test_an_unknown_name_lists_the_shipped_profiles() -> None:
    with pytest.raises(ProfileError) as caught:
        load_profile("tpu-llama9")
    assert "tpu-llama9: no such profile" in str(caught.value)
    assert "h100-llama3-8b" in str(caught.value)


def test_profiles_load_from_a_zipped_package(tmp_path: pathlib.Path) -> None:
    """Package data read through importlib.resources works from a zip (as in a pex)."""
    package_dir = pathlib.Path(inferno_backend.__file__).parent
    archive = tmp_path / "backend.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in package_dir.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                zipped.write(path, path.relative_to(package_dir.parent).as_posix())
    script = (
        "import inferno_backend.profiles as p\n"
        "assert '.zip' in p.__file__, p.__file__\n"
        "print(p.profile_names(), p.load_profile('h100-llama3-8b').max_num_seqs)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(archive)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "'h100-llama3-8b'" in result.stdout
    assert result.stdout.strip().endswith("256")
