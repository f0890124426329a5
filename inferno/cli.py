"""The ``inferno`` command: a table of subcommands, roles from plugins, lazy imports.

``inferno <role> [options]`` runs a role offered by a plugin through
``inferno_roles()``.  Built-in commands:

* ``inferno plugins [--json]``: every plugin, where it comes from, the hooks it
  implements, and every plugin that failed to load with its error (status 1
  when one failed, so an image build can check its plugins load);
* ``inferno config <role> [options]``: the effective configuration of a role
  as TOML, the source of every value in a comment;
* ``inferno version``: Inferno, Python and platform.

Building the command line imports plugin modules (to read their Role specs)
but never a role's code, and not anyio: ``inferno --help`` stays fast.

Exit status: 0 success; 1 error (a plugin or role failed, or an unexpected
error, shown with its traceback); 2 bad usage or bad configuration (one line
per problem on stderr); 130/143 a second SIGINT/SIGTERM (see
:mod:`inferno.lifecycle`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from inferno import __version__
from inferno.errors import ConfigError, InfernoError, PluginError

if TYPE_CHECKING:
    import pluggy

    from inferno.config import Config
    from inferno.plugins import PluginInfo
    from inferno.roles import Role

__all__ = ["EXIT_CONFIG", "EXIT_ERROR", "EXIT_OK", "build_parser", "main", "run"]

EXIT_OK = 0
EXIT_ERROR = 1
#: Bad usage or configuration: the argparse and sysexits convention for "you asked wrongly".
EXIT_CONFIG = 2
#: Ctrl-C before the role's signal handling is in place: 128 + SIGINT, as a shell reports it.
EXIT_INTERRUPTED = 130

DISTRIBUTION = "inferno-cloud"

#: Names the configuration file when ``--config`` is not given (handy in containers).
ENV_CONFIG = "INFERNO_CONFIG"

Handler = Callable[[argparse.Namespace, "pluggy.PluginManager"], int]


def run() -> None:
    """Console-script entry point: ``sys.exit(main())``."""
    sys.exit(main())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``inferno`` command with ``argv`` (default ``sys.argv[1:]``); return its status.

    Expected errors (bad configuration, a broken plugin, a role's own
    :class:`~inferno.errors.InfernoError`) print one line per problem and no
    traceback; anything else prints its traceback and returns 1.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(args)
    except SystemExit as exc:  # argparse after --help, --version or a usage error
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_CONFIG)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    except InfernoError as exc:
        print(f"inferno: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        return EXIT_ERROR


def _main(argv: list[str]) -> int:
    from inferno.plugins import get_plugin_manager, load_failures

    pm = get_plugin_manager()
    failures = len(load_failures(pm))
    try:
        parser = build_parser(_roles(pm), failures=failures)
    except PluginError:
        if _command_of(argv) not in ("plugins", "version"):
            raise
        parser = build_parser({}, failures=failures)  # these must work to diagnose the plugin
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_CONFIG
    return handler(args, pm)


def _roles(pm: pluggy.PluginManager) -> dict[str, Role]:
    from inferno.plugins import collect_roles

    return {name: role for name, (role, _) in collect_roles(pm).items()}


def _command_of(argv: list[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(roles: Mapping[str, Role], *, failures: int = 0) -> argparse.ArgumentParser:
    """The whole command line: one subcommand per role, then the built-in commands."""
    epilog = "Each role also reads INFERNO_<SECTION>_<KEY> variables and a TOML file (--config)."
    if failures:
        epilog += f" {failures} plugin(s) failed to load: see 'inferno plugins'."
    parser = argparse.ArgumentParser(
        prog="inferno",
        description="A self-healing cloud for AI inference.",
        epilog=epilog,
    )
    parser.add_argument("--version", action="version", version=f"inferno {__version__}")
    all_sections = sorted({s.name for role in roles.values() for s in role.sections})
    parser.set_defaults(all_sections=all_sections)
    commands = parser.add_subparsers(title="commands", metavar="<command>")
    for name, role in roles.items():
        sub = commands.add_parser(name, help=role.help, description=role.description or role.help)
        _add_role_options(sub, role)
        sub.set_defaults(handler=_run_role, role=role)

    config = commands.add_parser(
        "config",
        help="print a role's effective configuration, with the source of every value",
        description="Print the effective configuration of a role as TOML; a comment after "
        "every value says where it came from.  Secrets are redacted.",
    )
    config_roles = config.add_subparsers(title="roles", metavar="<role>", required=True)
    for name, role in roles.items():
        sub = config_roles.add_parser(name, help=role.help)
        _add_role_options(sub, role)
        sub.set_defaults(handler=_show_config, role=role)

    plugins = commands.add_parser(
        "plugins",
        help="list plugins and the hooks they implement",
        description="List every plugin: name, distribution and version, hooks it implements, "
        "and every plugin that failed to load with its error (exit status 1 if any did).",
    )
    plugins.add_argument("--json", action="store_true", help="write JSON instead of text")
    plugins.set_defaults(handler=_list_plugins)

    version = commands.add_parser("version", help="print the versions of Inferno and Python")
    version.set_defaults(handler=_show_version)
    return parser


def _add_role_options(parser: argparse.ArgumentParser, role: Role) -> None:
    from inferno.config import add_flags
    from inferno.lifecycle import role_sections
    from inferno.logs import add_logging_flags

    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help=f"TOML configuration file to read [default: env {ENV_CONFIG}, else none]",
    )
    add_logging_flags(parser)
    try:
        add_flags(parser, role_sections(role), role.name)
    except ValueError as exc:  # two settings derive one flag or variable: the plugin's bug
        raise PluginError(f"role {role.name!r}: {exc}") from exc


def _load_config(args: argparse.Namespace) -> tuple[Config, tuple[str, str]]:
    """The role's configuration and the logging options, or one ConfigError naming all problems."""
    from inferno.config import flags_from_namespace, load_config
    from inferno.lifecycle import role_sections
    from inferno.logs import logging_options

    role: Role = args.role
    sections = role_sections(role)
    own = {section.name for section in sections}
    log_options, problems = logging_options(args, os.environ)
    try:
        config = load_config(
            sections,
            role=role.name,
            toml_path=args.config or os.environ.get(ENV_CONFIG) or None,
            environ=os.environ,
            flags=flags_from_namespace(args),
            # One file may configure every role: other roles' tables are not errors here.
            other_sections=[name for name in args.all_sections if name not in own],
        )
    except ConfigError as exc:
        raise ConfigError([*problems, *exc.problems]) from None
    if problems:
        raise ConfigError(problems)
    return config, log_options


def _run_role(args: argparse.Namespace, pm: pluggy.PluginManager) -> int:
    import logging

    from inferno.lifecycle import run_role
    from inferno.logs import setup_logging
    from inferno.plugins import load_failures

    config, (level, fmt) = _load_config(args)
    setup_logging(level, fmt)
    log = logging.getLogger("inferno.cli")
    for failure in load_failures(pm):
        log.warning("plugin %s failed to load: %s", _describe(failure), failure.error)
    return run_role(args.role, config, pm)


def _show_config(args: argparse.Namespace, pm: pluggy.PluginManager) -> int:
    from inferno.config import render_toml

    config, _ = _load_config(args)
    sys.stdout.write(render_toml(config))
    return EXIT_OK


def _list_plugins(args: argparse.Namespace, pm: pluggy.PluginManager) -> int:
    from inferno.plugins import list_plugins

    infos = list_plugins(pm)
    problem = None
    try:
        build_parser(_roles(pm))  # the checks `inferno <role>` would make
    except PluginError as exc:
        problem = str(exc)
    if args.json:
        document = {"plugins": [info.to_json() for info in infos], "error": problem}
        print(json.dumps(document, indent=2))
    else:
        if not infos:
            print("no plugins")
        for info in infos:
            print(f"{info.name}  {_describe(info)}")
            if info.error is not None:
                print(f"    FAILED: {info.error}")
            else:
                print(f"    hooks: {', '.join(info.hooks) or '(none)'}")
        if problem:
            print(f"error: {problem}")
    failed = problem is not None or any(info.failed for info in infos)
    return EXIT_ERROR if failed else EXIT_OK


def _describe(info: PluginInfo) -> str:
    """``inferno-hello-plugin 0.3.1 (entry point inferno_hello.plugin)``, or the source alone."""
    origin = f"{info.source} {info.module}" if info.module != info.name else f"from {info.source}"
    if info.distribution:
        return f"{info.distribution} {info.version} ({origin})"
    return f"({origin})"


def _show_version(args: argparse.Namespace, pm: pluggy.PluginManager) -> int:
    print(f"inferno {__version__} ({DISTRIBUTION})")
    print(f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})")
    print(f"platform {platform.platform()}")
    return EXIT_OK
