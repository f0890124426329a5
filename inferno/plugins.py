"""The plugin manager: how plugins are found, loaded, listed and asked.

Nothing is loaded when this module is imported.  :func:`get_plugin_manager`
builds the manager on first use, in this order:

1. ``INFERNO_PLUGIN_PATH`` (directories separated by ``os.pathsep``) is added
   to ``sys.path`` with :func:`site.addsitedir`, so ``.pth`` files there work
   and distributions installed there (``pip install --target DIR``) are seen by
   entry-point discovery.  This is Inferno's own mechanism: it works the same
   from a source checkout, a virtual environment and every pex mode, where
   the interpreter's site-packages may be deliberately hidden.
2. First-party defaults (:data:`DEFAULT_PLUGINS`, the core's own hooks; none
   today: first-party roles are plugins with entry points like any other).
3. Entry points of group ``inferno``, each loaded on its own: one that fails
   to import is recorded (:func:`load_failures`) and the others still load.
4. ``INFERNO_PLUGINS`` (modules separated by commas) for unpackaged plugins.

A plugin that implements a hook Inferno does not define (a typo, or a hook of
a newer Inferno) is refused and recorded as a failure too, so the mistake is
visible in ``inferno plugins`` instead of silently doing nothing.
"""

from __future__ import annotations

import importlib
import os
import re
import site
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from inferno import hookspecs
from inferno.errors import PluginError

if TYPE_CHECKING:
    from inferno.roles import Role

__all__ = [
    "BUILTIN_COMMANDS",
    "DEFAULT_PLUGINS",
    "ENTRY_POINT_GROUP",
    "EntryPoint",
    "InfernoPluginManager",
    "Named",
    "PluginInfo",
    "add_plugin_path",
    "call_impl",
    "collect_named",
    "collect_roles",
    "find_entry_points",
    "get_plugin_manager",
    "hook_impls",
    "hookimpl",
    "list_plugins",
    "load_failures",
]

hookimpl = pluggy.HookimplMarker(hookspecs.PROJECT_NAME)

#: The entry-point group a distribution registers its plugin module under.
ENTRY_POINT_GROUP = "inferno"

#: Modules registered before any entry point: the core's own hook implementations.
DEFAULT_PLUGINS: tuple[str, ...] = ()

#: Subcommands the CLI defines itself; a role may not take these names.
BUILTIN_COMMANDS = frozenset({"plugins", "config", "version"})

#: Environment variables read by :func:`get_plugin_manager`.
ENV_PLUGINS = "INFERNO_PLUGINS"
ENV_PLUGIN_PATH = "INFERNO_PLUGIN_PATH"


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """What ``inferno plugins`` shows about one plugin, loaded or failed.

    :param name: the name it is registered under (entry-point or module name).
    :param source: ``"default"``, ``"entry point"`` or ``"INFERNO_PLUGINS"``.
    :param distribution: the distribution that declared it, when known.
    :param version: that distribution's version, when known.
    :param module: the plugin's import name (``"inferno_hello.plugin"``).
    :param hooks: names of the hooks it implements (empty when it failed).
    :param error: ``"ExceptionType: message"`` when it failed to load, else ``None``.
    """

    name: str
    source: str
    distribution: str | None = None
    version: str | None = None
    module: str = ""
    hooks: tuple[str, ...] = ()
    error: str | None = None

    @property
    def failed(self) -> bool:
        """Whether the plugin failed to load (and is not registered)."""
        return self.error is not None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dictionary (``inferno plugins --json``)."""
        return {
            "name": self.name,
            "source": self.source,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "hooks": list(self.hooks),
            "error": self.error,
        }


class InfernoPluginManager(pluggy.PluginManager):
    """A :class:`pluggy.PluginManager` that remembers where each plugin came from."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        #: name -> what we know of a registered plugin (hooks filled in on listing)
        self.origins: dict[str, PluginInfo] = {}
        #: plugins that could not be loaded, in discovery order
        self.failures: list[PluginInfo] = []

    def load_plugin(self, plugin: object, info: PluginInfo) -> bool:
        """Register ``plugin`` as ``info.name``; record a failure instead of raising.

        A plugin reached twice (an installed one also named in ``INFERNO_PLUGINS``)
        is kept once, under its first name, and is not a failure.
        """
        if self.is_registered(plugin):
            return True
        try:
            self.register(plugin, name=info.name)
        except ValueError as exc:  # pluggy: name or object already registered
            self.failures.append(_failed(info, exc))
            return False
        except pluggy.PluginValidationError as exc:  # hook signature does not match its spec
            self.failures.append(_failed(info, exc))
            return False
        unknown = sorted(
            caller.name
            for caller in self.get_hookcallers(plugin) or ()
            if not caller.has_spec()
            and any(i.plugin is plugin and not i.optionalhook for i in caller.get_hookimpls())
        )
        if unknown:
            self.unregister(plugin)
            message = f"implements unknown hook(s): {', '.join(unknown)}"
            self.failures.append(_failed(info, PluginError(message)))
            return False
        self.origins[info.name] = info
        return True


def _failed(info: PluginInfo, exc: BaseException) -> PluginInfo:
    return PluginInfo(
        name=info.name,
        source=info.source,
        distribution=info.distribution,
        version=info.version,
        module=info.module,
        error=f"{type(exc).__name__}: {exc}",
    )


_cache: tuple[tuple[str, str], InfernoPluginManager] | None = None


def get_plugin_manager(
    *, environ: Mapping[str, str] | None = None, refresh: bool = False
) -> InfernoPluginManager:
    """Return the process's plugin manager, building it on first use.

    The manager is cached; it is rebuilt when ``refresh`` is true or when
    ``INFERNO_PLUGINS`` / ``INFERNO_PLUGIN_PATH`` differ from the cached build.

    :param environ: where to read ``INFERNO_PLUGINS`` and ``INFERNO_PLUGIN_PATH``
        (default: ``os.environ``).
    :param refresh: build a new manager even if one is cached.
    """
    global _cache
    env = os.environ if environ is None else environ
    key = (env.get(ENV_PLUGINS, ""), env.get(ENV_PLUGIN_PATH, ""))
    if _cache is not None and _cache[0] == key and not refresh:
        return _cache[1]
    add_plugin_path(key[1].split(os.pathsep))
    pm = InfernoPluginManager()
    for module_name in DEFAULT_PLUGINS:
        module = importlib.import_module(module_name)
        pm.load_plugin(module, PluginInfo(name=module_name, source="default", module=module_name))
    _load_entry_points(pm)
    _load_modules(pm, [m.strip() for m in key[0].split(",") if m.strip()])
    _cache = (key, pm)
    return pm


def add_plugin_path(directories: Iterable[str]) -> None:
    """Make plugins installed in ``directories`` importable and discoverable.

    Each directory is treated as a site directory (its ``.pth`` files are
    processed).  Empty entries are skipped; a missing directory is ignored so
    a stale path in a container image does not stop the process.
    """
    added = False
    for directory in directories:
        if directory and os.path.isdir(directory):
            path = os.path.abspath(directory)
            if path not in sys.path:
                site.addsitedir(path)
                added = True
    if added:
        # Finders cache directory listings; a new sys.path entry needs fresh ones.
        importlib.invalidate_caches()


def _load_entry_points(pm: InfernoPluginManager) -> None:
    seen: set[str] = set()
    for ep in find_entry_points(ENTRY_POINT_GROUP):
        info = PluginInfo(
            name=ep.name,
            source="entry point",
            distribution=ep.distribution,
            version=ep.version,
            module=ep.value,
        )
        if ep.name in seen:
            # Two distributions register one name: the first on sys.path wins,
            # as an import would, and the other is shown as not loaded.
            pm.failures.append(_failed(info, PluginError("entry point name already loaded")))
            continue
        seen.add(ep.name)
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            pm.failures.append(_failed(info, exc))
            continue
        pm.load_plugin(plugin, info)


# --- entry-point discovery ---------------------------------------------------
#
# importlib.metadata costs ~40 ms to import (email, zipfile, csv, ...): a third
# of `inferno --help`.  Entry points need much less: list the ``*.dist-info``
# (and legacy ``*.egg-info``) directories of each sys.path entry, read the
# ``entry_points.txt`` of each, and the Name/Version headers of the few
# distributions that have our group.  Same rules as the stdlib: sys.path
# order, and a distribution found twice counts once (the first one).


@dataclass(frozen=True, slots=True)
class EntryPoint:
    """One ``name = module:attr`` line of a distribution's ``entry_points.txt``."""

    name: str
    value: str
    distribution: str | None
    version: str | None

    def load(self) -> object:
        """Import the module and return the object the entry point names."""
        module_name, _, attrs = self.value.partition(":")
        target: object = importlib.import_module(module_name.strip())
        for attr in attrs.strip().split(".") if attrs.strip() else ():
            target = getattr(target, attr)
        return target


def find_entry_points(group: str, path: Iterable[str] | None = None) -> list[EntryPoint]:
    """Entry points of ``group`` of every distribution on ``path`` (default ``sys.path``)."""
    found: list[EntryPoint] = []
    seen: set[str] = set()
    for entry in sys.path if path is None else path:
        for meta_name, read in _metadata_dirs(entry or "."):
            stem = meta_name.rpartition(".")[0]
            key = _normalize(stem.partition("-")[0])
            if key in seen:
                continue
            seen.add(key)
            text = read("entry_points.txt")
            points = _parse_group(text, group) if text else []
            if not points:
                continue
            headers = read("METADATA") or read("PKG-INFO") or ""
            name = _header(headers, "Name") or stem.partition("-")[0]
            version = _header(headers, "Version") or stem.partition("-")[2] or None
            found += [EntryPoint(n, v, name, version) for n, v in points]
    return found


Reader = Callable[[str], "str | None"]


def _metadata_dirs(entry: str) -> list[tuple[str, Reader]]:
    """``(dist-info name, reader of its files)`` for one sys.path entry, sorted by name."""
    suffixes = (".dist-info", ".egg-info")
    if os.path.isdir(entry):
        try:
            names = sorted(n for n in os.listdir(entry) if n.endswith(suffixes))
        except OSError:
            return []
        return [(name, _dir_reader(os.path.join(entry, name))) for name in names]
    if os.path.isfile(entry):  # a zip on sys.path (zipimport), as the stdlib also reads
        import zipfile

        try:
            archive = zipfile.ZipFile(entry)
        except (OSError, zipfile.BadZipFile):
            return []
        tops = {n.split("/", 1)[0] for n in archive.namelist() if "/" in n}
        return [(n, _zip_reader(archive, n)) for n in sorted(tops) if n.endswith(suffixes)]
    return []


def _dir_reader(directory: str) -> Reader:
    def read(filename: str) -> str | None:
        try:
            with open(os.path.join(directory, filename), encoding="utf-8") as file:
                return file.read()
        except (OSError, UnicodeDecodeError):
            return None

    return read


def _zip_reader(archive: Any, directory: str) -> Reader:
    def read(filename: str) -> str | None:
        try:
            data: bytes = archive.read(f"{directory}/{filename}")
            return data.decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            return None

    return read


def _normalize(name: str) -> str:
    """PEP 503 normalisation, with ``_`` as dist-info directory names spell it."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _parse_group(text: str, group: str) -> list[tuple[str, str]]:
    """``name = value`` pairs of the ``[group]`` section of an entry_points.txt (INI)."""
    pairs: list[tuple[str, str]] = []
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
        elif current == group and "=" in line:
            name, _, value = line.partition("=")
            pairs.append((name.strip(), value.strip()))
    return pairs


def _header(metadata: str, field: str) -> str | None:
    """One header of a METADATA/PKG-INFO file (RFC 822 style; headers end at a blank line)."""
    prefix = f"{field.lower()}:"
    for line in metadata.splitlines():
        if not line.strip():
            break
        if line.lower().startswith(prefix):
            return line[len(prefix) :].strip()
    return None


def _load_modules(pm: InfernoPluginManager, module_names: list[str]) -> None:
    for module_name in module_names:
        info = PluginInfo(name=module_name, source=ENV_PLUGINS, module=module_name)
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            pm.failures.append(_failed(info, exc))
            continue
        pm.load_plugin(module, info)


def load_failures(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """Plugins that could not be loaded, with the error of each."""
    return list(pm.failures) if isinstance(pm, InfernoPluginManager) else []


def list_plugins(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """Every registered plugin with the hooks it implements, then every failure."""
    origins = pm.origins if isinstance(pm, InfernoPluginManager) else {}
    infos: list[PluginInfo] = []
    for name, plugin in pm.list_name_plugin():
        hooks = tuple(sorted(c.name for c in pm.get_hookcallers(plugin) or ()))
        base = origins.get(name) or PluginInfo(name=name, source="registered")
        infos.append(
            PluginInfo(
                name=name,
                source=base.source,
                distribution=base.distribution,
                version=base.version,
                module=base.module or getattr(plugin, "__name__", ""),
                hooks=hooks,
            )
        )
    return infos + load_failures(pm)


def hook_impls(pm: pluggy.PluginManager, hookname: str) -> list[pluggy.HookImpl]:
    """The implementations of a hook in pluggy's call order, wrappers left out.

    For callers that must attribute each result to its plugin or handle each
    implementation on its own (await it, survive its failure).

    :raises PluginError: ``hookname`` is not a hook of :mod:`inferno.hookspecs`.
    """
    caller = getattr(pm.hook, hookname, None)
    if caller is None or not caller.has_spec():
        raise PluginError(f"no such hook: {hookname}")
    # pluggy calls the last registered implementation first (LIFO, tryfirst/trylast applied).
    return [i for i in reversed(caller.get_hookimpls()) if not (i.wrapper or i.hookwrapper)]


def call_impl(impl: pluggy.HookImpl, kwargs: Mapping[str, Any]) -> Any:
    """Call one implementation with the hook arguments it asks for."""
    return impl.function(*(kwargs[name] for name in impl.argnames))


def _call_each(pm: pluggy.PluginManager, hookname: str, **kwargs: Any) -> list[tuple[str, Any]]:
    """Call every implementation of a hook and pair each result with its plugin's name.

    pluggy's own call returns bare results; duplicate detection needs to say
    *which* plugin offered what, so implementations are called one by one, in
    pluggy's call order.  Wrappers have no result of their own and are skipped.
    """
    results: list[tuple[str, Any]] = []
    for impl in hook_impls(pm, hookname):
        try:
            result = call_impl(impl, kwargs)
        except Exception as exc:
            raise PluginError(
                f"plugin {impl.plugin_name!r}: {hookname}() raised {type(exc).__name__}: {exc}"
            ) from exc
        if result is not None:
            results.append((impl.plugin_name, result))
    return results


@dataclass(frozen=True, slots=True)
class Named:
    """One entry of a merged name table: the factory and the plugin that offered it."""

    name: str
    factory: hookspecs.Factory
    plugin: str


def collect_named(pm: pluggy.PluginManager, hookname: str, **kwargs: Any) -> dict[str, Named]:
    """Merge a named collection hook (``inferno_engines``, ...) into one table.

    :param hookname: the hook to call, for example ``"inferno_engines"``.
    :param kwargs: hook arguments (none for today's named hooks).
    :returns: ``{name: Named(name, factory, plugin)}`` sorted by name.
    :raises PluginError: a plugin returned something other than a mapping of
        non-empty names to callables, or two plugins offer the same name (every
        clash is listed, naming both plugins).
    """
    table: dict[str, Named] = {}
    clashes: list[str] = []
    for plugin, result in _call_each(pm, hookname, **kwargs):
        if not isinstance(result, Mapping):
            raise PluginError(
                f"plugin {plugin!r}: {hookname}() returned {type(result).__name__}, "
                "expected a mapping of name to factory"
            )
        for name, factory in result.items():
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {plugin!r}: {hookname}() returned a bad name {name!r}")
            if not callable(factory):
                raise PluginError(f"plugin {plugin!r}: {hookname}() entry {name!r} is not callable")
            if name in table:
                owners = " and ".join(repr(p) for p in sorted((table[name].plugin, plugin)))
                clashes.append(f"{hookname}: {name!r} is offered by both {owners}")
                continue
            table[name] = Named(name, factory, plugin)
    if clashes:
        raise PluginError("; ".join(clashes))
    return dict(sorted(table.items()))


def collect_roles(pm: pluggy.PluginManager) -> dict[str, tuple[Role, str]]:
    """Every role offered through ``inferno_roles()``: ``{name: (role, plugin name)}``.

    :raises PluginError: a plugin returned something that is not a Role, two
        plugins offer the same role, or a role takes a built-in command's name.
    """
    from inferno.roles import Role

    roles: dict[str, tuple[Role, str]] = {}
    for plugin, result in _call_each(pm, "inferno_roles"):
        if not isinstance(result, (list, tuple)):
            raise PluginError(
                f"plugin {plugin!r}: inferno_roles() returned {type(result).__name__}, "
                "expected a list of Role"
            )
        for role in result:
            if not isinstance(role, Role):
                raise PluginError(
                    f"plugin {plugin!r}: inferno_roles() returned {role!r}, expected a Role"
                )
            if role.name in BUILTIN_COMMANDS:
                raise PluginError(
                    f"plugin {plugin!r}: role {role.name!r} clashes with a built-in command"
                )
            if role.name in roles:
                owners = " and ".join(repr(p) for p in sorted((roles[role.name][1], plugin)))
                raise PluginError(f"role {role.name!r} is offered by both {owners}")
            roles[role.name] = (role, plugin)
    return dict(sorted(roles.items()))
