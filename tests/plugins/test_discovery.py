"""Discovery of installed plugin distributions through real entry points, in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from inferno import hookspecs
from inferno.plugins import EntryPoint, find_entry_points, hookimpl

ALL_HOOKS = sorted(name for name in vars(hookspecs) if name.startswith("inferno_"))


def plugins_json(run_inferno: Any, env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    result = run_inferno("plugins", "--json", env=env)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def test_installed_plugin_is_found_through_its_entry_point(
    plugin_site: Path, clean_env: dict[str, str], run_inferno: Any
) -> None:
    env = {**clean_env, "INFERNO_PLUGIN_PATH": f"/nonexistent:{plugin_site}"}
    status, document = plugins_json(run_inferno, env)
    by_name = {p["name"]: p for p in document["plugins"]}
    hello = by_name["hello"]
    assert hello["source"] == "entry point"
    assert (hello["distribution"], hello["version"]) == ("inferno-hello-plugin", "0.3.1")
    assert hello["module"] == "inferno_hello.plugin"
    assert hello["hooks"] == ALL_HOOKS
    assert hello["error"] is None
    # The broken distribution is reported by entry point, distribution and error ...
    broken = by_name["broken"]
    assert (broken["distribution"], broken["version"]) == ("inferno-broken-plugin", "0.0.7")
    assert broken["error"] == "RuntimeError: inferno_broken is broken on purpose"
    assert broken["hooks"] == []
    # ... and makes `inferno plugins` fail, so an image build can check its plugins.
    assert status == 1


def test_broken_plugin_does_not_stop_the_others_from_working(
    plugin_site: Path, clean_env: dict[str, str], run_inferno: Any
) -> None:
    env = {**clean_env, "INFERNO_PLUGIN_PATH": str(plugin_site)}
    result = run_inferno("--help", env=env)
    assert result.returncode == 0, result.stderr
    assert "say hello to every TCP connection" in result.stdout
    assert "1 plugin(s) failed to load" in " ".join(result.stdout.split())

    text = run_inferno("plugins", env=env)
    assert text.returncode == 1
    assert "hello  inferno-hello-plugin 0.3.1 (entry point inferno_hello.plugin)" in text.stdout
    assert "FAILED: RuntimeError: inferno_broken is broken on purpose" in text.stdout


def test_without_the_plugin_path_the_plugin_is_not_found(
    plugin_site: Path, clean_env: dict[str, str], run_inferno: Any
) -> None:
    _, document = plugins_json(run_inferno, clean_env)
    names = {p["name"] for p in document["plugins"]}
    assert not names & {"hello", "broken"}
    result = run_inferno("hello", env=clean_env)
    assert result.returncode == 2  # unknown command
    assert "invalid choice: 'hello'" in result.stderr


def test_pth_files_in_the_plugin_path_are_honoured(
    tmp_path: Path, clean_env: dict[str, str], run_inferno: Any
) -> None:
    source = Path(__file__).resolve().parent.parent / "fixtures" / "thirdparty_plugin" / "src"
    (tmp_path / "hello.pth").write_text(f"{source}\n")
    env = {
        **clean_env,
        "INFERNO_PLUGIN_PATH": str(tmp_path),
        "INFERNO_PLUGINS": "inferno_hello.plugin",
    }
    status, document = plugins_json(run_inferno, env)
    assert status == 0
    (hello,) = [p for p in document["plugins"] if p["name"] == "inferno_hello.plugin"]
    assert hello["source"] == "INFERNO_PLUGINS"
    assert "inferno_roles" in hello["hooks"]


def test_importing_the_plugin_module_loads_no_plugin(clean_env: dict[str, str]) -> None:
    source = Path(__file__).resolve().parent.parent / "fixtures" / "thirdparty_plugin" / "src"
    pythonpath = os.pathsep.join(filter(None, [str(source), clean_env.get("PYTHONPATH")]))
    env = {**clean_env, "PYTHONPATH": pythonpath, "INFERNO_PLUGINS": "inferno_hello.plugin"}
    code = "import sys, inferno.plugins, inferno.cli; print('inferno_hello' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.stdout.strip() == "False", result.stderr


def stdlib_entry_points(group: str, path: list[str]) -> list[tuple[str, str, str, str]]:
    """What importlib.metadata finds: the first distribution of each name, as entry_points()."""
    import importlib.metadata

    seen: set[str] = set()
    points = []
    for dist in importlib.metadata.distributions(path=path):
        key = dist.name.lower().replace("-", "_").replace(".", "_")
        if key in seen:
            continue
        seen.add(key)
        points += [
            (ep.name, ep.value, dist.name, dist.version)
            for ep in dist.entry_points
            if ep.group == group
        ]
    return sorted(points)


def ours(group: str, path: list[str]) -> list[tuple[str, str, str | None, str | None]]:
    return sorted(
        (e.name, e.value, e.distribution, e.version) for e in find_entry_points(group, path)
    )


def test_entry_point_discovery_agrees_with_importlib_metadata(plugin_site: Path) -> None:
    for group in ("inferno", "console_scripts", "pytest11"):
        assert ours(group, sys.path) == stdlib_entry_points(group, sys.path), group
    assert ours("inferno", [str(plugin_site)]) == [
        ("broken", "inferno_broken.plugin", "inferno-broken-plugin", "0.0.7"),
        ("hello", "inferno_hello.plugin", "inferno-hello-plugin", "0.3.1"),
    ]


def test_entry_points_are_found_in_a_zip_on_the_path(plugin_site: Path, tmp_path: Path) -> None:
    archive = tmp_path / "site.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in plugin_site.rglob("*"):
            if file.is_file():
                zf.write(file, file.relative_to(plugin_site).as_posix())
    assert ours("inferno", [str(archive)]) == ours("inferno", [str(plugin_site)])
    assert ours("inferno", [str(archive)]) == stdlib_entry_points("inferno", [str(archive)])


def test_a_distribution_on_two_paths_counts_once_and_egg_info_is_read(
    plugin_site: Path, tmp_path: Path
) -> None:
    egg = tmp_path / "Legacy.Plugin-1.2-py3.11.egg-info"
    egg.mkdir()
    (egg / "PKG-INFO").write_text("Metadata-Version: 1.1\nName: Legacy.Plugin\nVersion: 1.2\n")
    (egg / "entry_points.txt").write_text("# old style\n[inferno]\nlegacy = legacy_mod:plugin\n")
    found = ours("inferno", [str(plugin_site), str(tmp_path), str(plugin_site)])
    assert found == [
        ("broken", "inferno_broken.plugin", "inferno-broken-plugin", "0.0.7"),
        ("hello", "inferno_hello.plugin", "inferno-hello-plugin", "0.3.1"),
        ("legacy", "legacy_mod:plugin", "Legacy.Plugin", "1.2"),
    ]


def test_an_entry_point_may_name_an_attribute() -> None:
    ep = EntryPoint("x", "inferno.plugins:hookimpl", None, None)
    assert ep.load() is hookimpl
