"""Meta-tests: every hook is documented, and every hook reaches a real plugin."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import pytest

from inferno import hookspecs
from inferno.plugins import collect_named, collect_roles, get_plugin_manager

#: Hooks returning a name -> factory table, merged by collect_named.
NAMED_HOOKS = {
    "inferno_engines",
    "inferno_health_checkers",
    "inferno_routing_policies",
    "inferno_providers",
    "inferno_telemetry_sources",
}
#: Hooks returning Role specs.
ROLE_HOOKS = {"inferno_roles"}
#: Hooks the lifecycle calls around a running role; exercised end to end in
#: tests/lifecycle (a subprocess running the third-party `hello` role).
LIFECYCLE_HOOKS = {"inferno_startup", "inferno_shutdown", "inferno_reload"}


def all_hookspecs() -> dict[str, Callable[..., Any]]:
    return {
        name: function
        for name, function in vars(hookspecs).items()
        if name.startswith("inferno_") and callable(function)
    }


def documentation_problems(function: Callable[..., Any]) -> list[str]:
    """What is missing from a hook's docstring: a summary, a :param: per argument, :returns:."""
    doc = inspect.getdoc(function) or ""
    problems = []
    if not doc.strip():
        return ["no docstring"]
    summary = doc.strip().splitlines()[0]
    if summary.startswith(":") or len(summary) < 10:
        problems.append("no one-line summary")
    for name in inspect.signature(function).parameters:
        if not re.search(rf"^:param {name}: \S", doc, re.MULTILINE):
            problems.append(f"no ':param {name}:' line")
    if not re.search(r"^:returns: \S", doc, re.MULTILINE):
        problems.append("no ':returns:' line saying what the result means")
    return problems


def test_hookspecs_module_defines_the_hooks_of_the_design() -> None:
    assert set(all_hookspecs()) == NAMED_HOOKS | ROLE_HOOKS | LIFECYCLE_HOOKS


@pytest.mark.parametrize("name", sorted(all_hookspecs()))
def test_every_hook_is_documented(name: str) -> None:
    function = all_hookspecs()[name]
    assert documentation_problems(function) == []
    assert function.__annotations__.get("return"), f"{name} has no return annotation"
    for parameter in inspect.signature(function).parameters.values():
        assert parameter.annotation is not inspect.Parameter.empty, f"{name}({parameter.name})"


def test_documentation_check_catches_what_is_missing() -> None:
    def inferno_bad(role: object, app: object) -> None:
        """Do something.

        :param role: the role.
        """

    assert documentation_problems(inferno_bad) == [
        "no ':param app:' line",
        "no ':returns:' line saying what the result means",
    ]
    assert documentation_problems(lambda: None) == ["no docstring"]


def test_every_hook_is_a_registered_spec() -> None:
    pm = get_plugin_manager(environ={}, refresh=True)
    for name in all_hookspecs():
        assert getattr(pm.hook, name).has_spec(), name


@pytest.mark.usefixtures("hello_importable")
def test_every_collection_hook_reaches_a_third_party_plugin() -> None:
    pm = get_plugin_manager(environ={"INFERNO_PLUGINS": "inferno_hello.plugin"}, refresh=True)
    plugin = "inferno_hello.plugin"
    for hookname in sorted(NAMED_HOOKS):
        table = collect_named(pm, hookname)
        offered = {name: named for name, named in table.items() if named.plugin == plugin}
        assert len(offered) == 1, hookname
        (named,) = offered.values()
        assert named.factory(None).startswith("hello "), hookname
    role, owner = collect_roles(pm)["hello"]
    assert (role.entry, owner) == ("inferno_hello.role:run", plugin)
