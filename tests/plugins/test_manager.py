"""The plugin manager in process: registration, failures, merged name tables."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from inferno.errors import PluginError
from inferno.plugins import (
    InfernoPluginManager,
    PluginInfo,
    add_plugin_path,
    collect_named,
    collect_roles,
    get_plugin_manager,
    hookimpl,
    list_plugins,
    load_failures,
)
from inferno.roles import Role


def factory(ctx: Any = None) -> str:
    return "made"


class EnginesA:
    @hookimpl
    def inferno_engines(self) -> Mapping[str, Any]:
        return {"sim": factory, "alpha": factory}


class EnginesB:
    @hookimpl
    def inferno_engines(self) -> Mapping[str, Any]:
        return {"sim": factory, "beta": factory}


class NoEngines:
    @hookimpl
    def inferno_engines(self) -> None:
        return None


def manager(**plugins: object) -> InfernoPluginManager:
    pm = InfernoPluginManager()
    for name, plugin in plugins.items():
        assert pm.load_plugin(plugin, PluginInfo(name=name, source="test"))
    return pm


def test_collect_named_merges_every_plugin_and_names_the_owner() -> None:
    pm = manager(a=EnginesA(), none=NoEngines())
    table = collect_named(pm, "inferno_engines")
    assert list(table) == ["alpha", "sim"]
    assert table["sim"].plugin == "a"
    assert table["sim"].factory() == "made"


def test_collect_named_refuses_a_name_offered_twice_naming_both_plugins() -> None:
    pm = manager(a=EnginesA(), b=EnginesB())
    with pytest.raises(PluginError, match=r"inferno_engines: 'sim' is offered by both '.' and '.'"):
        collect_named(pm, "inferno_engines")


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (["sim"], "returned list, expected a mapping"),
        ({"": factory}, "bad name ''"),
        ({"sim": "not callable"}, "entry 'sim' is not callable"),
    ],
)
def test_collect_named_refuses_a_malformed_result(result: object, message: str) -> None:
    class Bad:
        @hookimpl
        def inferno_providers(self) -> object:
            return result

    with pytest.raises(PluginError, match=f"plugin 'bad': inferno_providers.*{message}"):
        collect_named(manager(bad=Bad()), "inferno_providers")


def test_a_hook_that_raises_is_reported_with_its_plugin() -> None:
    class Raises:
        @hookimpl
        def inferno_routing_policies(self) -> object:
            raise LookupError("no table")

    with pytest.raises(PluginError, match=r"plugin 'r'.*raised LookupError: no table"):
        collect_named(manager(r=Raises()), "inferno_routing_policies")


def test_collect_named_refuses_an_unknown_hook() -> None:
    with pytest.raises(PluginError, match="no such hook: inferno_nothing"):
        collect_named(manager(), "inferno_nothing")


def roles_plugin(*names: str) -> object:
    class Roles:
        @hookimpl
        def inferno_roles(self) -> list[Role]:
            return [Role(name=n, help=f"{n} role", entry=f"nowhere_{n}:run") for n in names]

    return Roles()


def test_collect_roles_refuses_a_role_offered_twice() -> None:
    pm = manager(first=roles_plugin("proxy"), second=roles_plugin("proxy"))
    with pytest.raises(PluginError, match=r"role 'proxy' is offered by both '.*' and '.*'"):
        collect_roles(pm)


@pytest.mark.parametrize("name", ["plugins", "config", "version"])
def test_collect_roles_refuses_a_builtin_command_name(name: str) -> None:
    with pytest.raises(PluginError, match=f"role '{name}' clashes with a built-in command"):
        collect_roles(manager(p=roles_plugin(name)))


def test_collect_roles_refuses_what_is_not_a_role() -> None:
    class Strings:
        @hookimpl
        def inferno_roles(self) -> list[str]:
            return ["proxy"]

    with pytest.raises(PluginError, match="returned 'proxy', expected a Role"):
        collect_roles(manager(s=Strings()))


def test_a_plugin_implementing_an_unknown_hook_is_refused_and_recorded() -> None:
    class Typo:
        @hookimpl
        def inferno_role(self) -> list[Role]:  # missing "s"
            return []

    pm = InfernoPluginManager()
    assert not pm.load_plugin(Typo(), PluginInfo(name="typo", source="test"))
    (failure,) = load_failures(pm)
    assert failure.name == "typo"
    assert failure.error == "PluginError: implements unknown hook(s): inferno_role"
    assert pm.get_plugin("typo") is None


def test_a_plugin_with_a_wrong_hook_signature_is_refused_and_recorded() -> None:
    class WrongArgument:
        @hookimpl
        def inferno_startup(self, rolle: object) -> None:
            pass

    pm = InfernoPluginManager()
    assert not pm.load_plugin(WrongArgument(), PluginInfo(name="w", source="test"))
    (failure,) = load_failures(pm)
    assert failure.error is not None
    assert failure.error.startswith("PluginValidationError:")
    assert "rolle" in failure.error


def test_list_plugins_shows_hooks_then_failures() -> None:
    pm = manager(a=EnginesA(), r=roles_plugin("x"))
    pm.load_plugin(EnginesA(), PluginInfo(name="a", source="test"))  # the name is taken
    infos = list_plugins(pm)
    assert [(i.name, i.hooks, i.failed) for i in infos] == [
        ("a", ("inferno_engines",), False),
        ("r", ("inferno_roles",), False),
        ("a", (), True),
    ]
    assert infos[2].to_json()["error"].startswith("ValueError:")


@pytest.mark.usefixtures("hello_importable")
def test_inferno_plugins_variable_loads_modules_and_records_the_broken_ones() -> None:
    environ = {"INFERNO_PLUGINS": " no_such_module_for_inferno , inferno_hello.plugin,"}
    pm = get_plugin_manager(environ=environ, refresh=True)
    infos = {info.name: info for info in list_plugins(pm)}
    hello = infos["inferno_hello.plugin"]
    assert hello.source == "INFERNO_PLUGINS"
    assert "inferno_roles" in hello.hooks
    broken = infos["no_such_module_for_inferno"]
    assert broken.error is not None
    assert broken.error.startswith("ModuleNotFoundError:")
    assert "hello" in collect_roles(pm)


def test_the_manager_is_cached_until_its_environment_changes() -> None:
    first = get_plugin_manager(environ={}, refresh=True)
    assert get_plugin_manager(environ={}) is first
    assert get_plugin_manager(environ={}, refresh=True) is not first
    changed = get_plugin_manager(environ={"INFERNO_PLUGINS": "json"})
    assert changed is not first
    assert changed.get_plugin("json") is not None


def test_plugin_path_directories_are_site_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))  # undone after the test
    site_dir = tmp_path / "site"
    extra = tmp_path / "extra"
    site_dir.mkdir()
    extra.mkdir()
    (site_dir / "more.pth").write_text(f"{extra}\n")
    add_plugin_path(["", str(tmp_path / "missing"), str(site_dir)])
    assert str(site_dir) in sys.path
    assert str(extra) in sys.path  # the .pth file was processed
    assert str(tmp_path / "missing") not in sys.path


def test_a_plugin_reached_twice_is_kept_once_without_failure() -> None:
    plugin = EnginesA()
    pm = manager(a=plugin)
    assert pm.load_plugin(plugin, PluginInfo(name="again", source="INFERNO_PLUGINS"))
    assert [info.name for info in list_plugins(pm)] == ["a"]
