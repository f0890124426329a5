#!/usr/bin/env python3
"""Build ``dist/inferno.pex``: Inferno and its dependencies in one executable file.

Usage::

    python build_pex.py [--with REQUIREMENT ...] [--roles proxy,backend] [--out dist]

The pex is universal (pure-Python wheels only) and runs under CPython 3.10,
3.11, 3.12 and 3.13.  Each choice below answers a failure seen with the
defaults; docs/packaging.md is the user-facing account.

* pex and the pip it drives are pinned: pex's vendored pip cannot target
  3.12/3.13, and an unpinned pair gives a different file from the same inputs.
* The resolve runs once per CPython minor, each described by a *complete
  platform* that admits only ``*-none-any`` wheels.  Resolving for the build
  interpreter alone silently leaves out what only 3.10 needs (anyio's
  ``exceptiongroup``), and the pex then quietly re-executes itself under
  another interpreter; admitting only ``none-any`` tags makes a dependency
  without a pure-Python wheel fail the build instead of shipping one machine's
  binary.
* ``--interpreter-constraint`` records 3.10-3.13 in the pex: the runtime then
  keys its unpacked venv on the pex alone, not on the build machine's
  interpreter path, so the ``/bin/sh`` fast path finds it on every machine.
* ``--sh-boot --venv``: a warm start is ``/bin/sh`` exec'ing the cached venv's
  python directly, no Python-level bootstrap.
* No bytecode and pex's fixed timestamps: two builds of the same inputs with
  the same build interpreter minor are byte-identical.
* A preamble picks a private per-user ``PEX_ROOT`` when ``~/.cache/pex``
  cannot be written (no or read-only HOME), so such users still start warm.

``--with`` bakes extra distributions in (a requirement, or a local project
directory / wheel / sdist), resolved together with Inferno.  ``--roles`` also
writes ``dist/inferno-<role>.pex`` per role: without the other roles' packages
(see :func:`plan_role`).
"""

from __future__ import annotations

import argparse
import base64
import configparser
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent

#: pex pinned here and in pyproject's ``dev`` extra: the output depends on its version.
PEX_VERSION = "2.105.2"
#: The pip pex resolves with; pex's vendored 20.3.4 cannot target CPython 3.12/3.13.
PIP_VERSION = "25.2"
#: CPython 3.<minor> versions the pex is resolved for and promises to run under.
SUPPORTED_MINORS = (10, 11, 12, 13)
INTERPRETER_CONSTRAINT = f"CPython>=3.{SUPPORTED_MINORS[0]},<3.{SUPPORTED_MINORS[-1] + 1}"
#: ``#!/usr/bin/env python3`` semantics; with ``--sh-boot`` the file itself starts with
#: ``#!/bin/sh`` and this names the interpreter the boot script prefers.
PYTHON_SHEBANG = "/usr/bin/env python3"

PROJECT_NAME = "inferno-cloud"
CONSOLE_SCRIPT = "inferno"
#: The core import package: in every pex, whatever the role.
CORE_PACKAGE = "inferno"
ENTRY_POINT_GROUP = "inferno"

EXIT_FAILED = 1
EXIT_USAGE = 2

#: Local distributions ``--with`` accepts besides project directories.
ARCHIVES = (".whl", ".tar.gz", ".zip")
ROLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
#: The project name at the head of a PEP 508 requirement, then the rest of it.
REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?P<extras>\[[^\]]*\])?(?P<rest>[^;]*)(?P<marker>;.*)?$"
)

#: Python run at the top of the pex's ``__main__.py``, before pex's bootstrap reads PEX_ROOT.
#: pex 2.105 alone falls back to a fresh temporary PEX_ROOT, deleted at exit, whenever
#: ``~/.cache/pex`` is not writable: a cold start (seconds) and a warning on every run.
PEX_ROOT_PREAMBLE = """\
# Inferno (build_pex.py): a writable PEX_ROOT when ~/.cache/pex cannot be written.
def __inferno_choose_pex_root():
    import os, stat, tempfile

    if os.environ.get("PEX_ROOT"):
        return  # an explicit choice always wins
    path = os.path.expanduser("~/.cache/pex")
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK):
        return  # the default works
    uid = os.getuid()
    root = os.path.join(tempfile.gettempdir(), "inferno-pex-root-%d" % uid)
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return  # leave it to pex's own (slow) fallback
    info = os.lstat(root)
    # Never adopt a directory another user could have planted code in.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o022:
        return
    os.environ["PEX_ROOT"] = root


__inferno_choose_pex_root()
del __inferno_choose_pex_root
"""

#: Run inside the built pex (PEX_INTERPRETER=1) to learn which plugin module offers each role.
DISCOVER_ROLES = """\
import json, sys, types
from inferno.plugins import collect_roles, get_plugin_manager, load_failures
pm = get_plugin_manager()
roles = {}
try:
    offered = collect_roles(pm)
except Exception as exc:  # e.g. two plugins offer one role: say so, no traceback
    sys.exit("%s: %s" % (type(exc).__name__, exc))
for name, (role, plugin_name) in offered.items():
    plugin = pm.get_plugin(plugin_name)
    if isinstance(plugin, types.ModuleType):
        module = plugin.__name__
    else:
        module = type(plugin).__module__
    roles[name] = {"plugin": plugin_name, "module": module, "packages": list(role.packages)}
failures = ["%s: %s" % (f.name, f.error) for f in load_failures(pm)]
with open(sys.argv[-1], "w") as fp:
    json.dump({"roles": roles, "failures": failures}, fp)
"""


class BuildError(Exception):
    """Raised when the build cannot go on; carries the exit status to end with."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    """What the command line asked for."""

    out: Path
    extras: tuple[str, ...]
    roles: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class RoleInfo:
    """Where a role comes from: the providing plugin's module and the extra packages it needs."""

    name: str
    module: str
    packages: tuple[str, ...]

    @property
    def import_packages(self) -> frozenset[str]:
        """Top-level import packages a pex for this role must contain."""
        return frozenset({top_level(self.module), *(top_level(p) for p in self.packages)})


@dataclasses.dataclass(frozen=True, slots=True)
class WheelContent:
    """What a wheel holds, as far as splitting it by role needs to know."""

    path: Path
    name: str  # canonical project name
    version: str
    top_levels: frozenset[str]
    entry_point_tops: frozenset[str]  # top-level packages its ``inferno`` entry points name


def parse_args(argv: Sequence[str]) -> Options:
    """Parse the command line; bad usage exits with status 2 through argparse."""
    parser = argparse.ArgumentParser(
        prog="build_pex.py",
        description="Build dist/inferno.pex (and per-role pexes) for CPython 3.10-3.13.",
    )
    parser.add_argument(
        "--with",
        dest="extras",
        action="append",
        default=[],
        metavar="REQUIREMENT",
        help="also bake in this distribution: a requirement (resolved from PyPI together with "
        "Inferno) or a local project directory, wheel or sdist; repeatable",
    )
    parser.add_argument(
        "--roles",
        default="",
        metavar="ROLE[,ROLE...]",
        help="also write dist/inferno-<role>.pex for each role, without the other roles' packages",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=PROJECT_DIR / "dist",
        metavar="DIR",
        help="output directory (default: dist/ next to this script)",
    )
    args = parser.parse_args(argv)
    for item in args.extras:
        if looks_like_path(item) and not Path(item).exists():
            parser.error(f"--with {item}: no such file or directory")
    roles: list[str] = []
    if args.roles:
        for name in (part.strip() for part in args.roles.split(",")):
            if not ROLE_NAME.match(name):
                parser.error(f"--roles: {name!r} is not a role name (letters, digits, - and _)")
            if name not in roles:
                roles.append(name)
    return Options(out=args.out, extras=tuple(args.extras), roles=tuple(roles))


def looks_like_path(item: str) -> bool:
    """Whether a ``--with`` item names a local path (as pip tells: a separator, a dot, a suffix)."""
    return os.sep in item or item.startswith(".") or item.endswith(ARCHIVES)


def check_environment() -> None:
    """Fail early, with the fix, when the build cannot give the promised result."""
    minor = sys.version_info[:2]
    if sys.implementation.name != "cpython" or minor not in {(3, m) for m in SUPPORTED_MINORS}:
        raise BuildError(
            f"build_pex.py must run under CPython 3.{SUPPORTED_MINORS[0]}-3.{SUPPORTED_MINORS[-1]}"
            f" (pex resolves with it); this is {sys.implementation.name} {sys.version.split()[0]}"
        )
    try:
        found = importlib.metadata.version("pex")
    except importlib.metadata.PackageNotFoundError:
        found = None
    if found != PEX_VERSION:
        have = f"pex {found} is installed" if found else "pex is not installed"
        raise BuildError(
            f"{have}; the build needs pex=={PEX_VERSION}: pip install -e '.[dev]' "
            f"(or pip install pex=={PEX_VERSION})"
        )


def canonical_name(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def top_level(dotted: str) -> str:
    """``"inferno_hello.plugin:attr"`` -> ``"inferno_hello"``."""
    return dotted.split(":", 1)[0].split(".", 1)[0].strip()


def complete_platform(minor: int) -> dict[str, object]:
    """A pex complete platform for CPython 3.<minor> on Linux admitting pure-Python wheels only.

    Only the markers that do not vary between Linux machines are given, so a
    dependency whose marker needs another one (``platform_machine``, ...)
    fails the build loudly instead of being decided for one machine.
    """
    tags = [f"cp3{minor}-none-any", f"py3{minor}-none-any", "py3-none-any"]
    tags += [f"py3{older}-none-any" for older in range(minor - 1, -1, -1)]
    return {
        "marker_environment": {
            "implementation_name": "cpython",
            "os_name": "posix",
            "platform_python_implementation": "CPython",
            "platform_system": "Linux",
            "python_version": f"3.{minor}",
            "sys_platform": "linux",
        },
        "compatible_tags": tags,
    }


def run_command(command: Sequence[str], *, what: str, env: dict[str, str] | None = None) -> None:
    """Run a build step; its own output goes to our stderr, a failure ends the build."""
    completed = subprocess.run(command, env=env, stdout=sys.stderr, check=False)
    if completed.returncode != 0:
        raise BuildError(f"{what} failed (exit status {completed.returncode})")


def build_wheel(source: Path, wheelhouse: Path, *, isolated: bool) -> Path:
    """Build one wheel of ``source`` (project directory or sdist) into ``wheelhouse``."""
    before = set(wheelhouse.glob("*.whl"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheelhouse)]
    if not isolated:
        command.append("--no-build-isolation")
    run_command([*command, str(source)], what=f"building a wheel of {source}")
    built = set(wheelhouse.glob("*.whl")) - before
    if len(built) != 1:
        raise BuildError(f"building a wheel of {source} gave {len(built)} new wheels, not one")
    return built.pop()


def wheel_name_version(path: Path) -> tuple[str, str]:
    """Project name (canonical) and version from a wheel's file name (PEP 427)."""
    parts = path.name[: -len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise BuildError(f"{path.name} is not a wheel file name")
    return canonical_name(parts[0]), parts[1]


def local_distributions(extras: Iterable[str], wheelhouse: Path) -> tuple[list[str], list[str]]:
    """Build Inferno's wheel and those of local ``--with`` items into ``wheelhouse``.

    :returns: (requirements for pex, project names that must come from the wheelhouse).
    Requirement strings that are not local paths are passed on to pex unchanged.
    """
    # Inferno's own build backend is in the dev environment: no download needed.
    isolated = importlib.util.find_spec("hatchling") is None
    ours = build_wheel(PROJECT_DIR, wheelhouse, isolated=isolated)
    name, version = wheel_name_version(ours)
    requirements, local = [f"{name}=={version}"], [name]
    for item in extras:
        path = Path(item)
        if not looks_like_path(item):
            requirements.append(item)
            continue
        if path.is_file() and path.suffix == ".whl":
            wheel = wheelhouse / path.name
            shutil.copyfile(path, wheel)
        else:
            wheel = build_wheel(path.resolve(), wheelhouse, isolated=True)
        name, version = wheel_name_version(wheel)
        requirements.append(f"{name}=={version}")
        local.append(name)
    return requirements, local


def build_pex(
    output: Path,
    requirements: Sequence[str],
    *,
    work: Path,
    find_links: Path,
    local_names: Sequence[str] = (),
    constraints: Path | None = None,
) -> None:
    """Run pex once: ``requirements`` resolved for every supported CPython minor."""
    preamble = work / "preamble.py"
    preamble.write_text(PEX_ROOT_PREAMBLE)
    command = [
        sys.executable,
        "-m",
        "pex",
        "--pip-version",
        PIP_VERSION,
        "--no-allow-pip-version-fallback",
        "--interpreter-constraint",
        INTERPRETER_CONSTRAINT,
        # ICs make pex look for a local interpreter: use this one, never a PATH shim.
        "--python-path",
        sys.executable,
        "--sh-boot",
        "--venv",
        "--python-shebang",
        PYTHON_SHEBANG,
        "--preamble-file",
        str(preamble),
        "--console-script",
        CONSOLE_SCRIPT,
        "--no-compile",  # bytecode would make the file differ from build to build
        "--jobs",
        str(max(2, os.cpu_count() or 1)),
        "--find-links",
        # Named only when --source scopes projects to it (pex ignores the name otherwise).
        f"local={find_links}" if local_names else str(find_links),
        "--output-file",
        str(output),
    ]
    for minor in SUPPORTED_MINORS:
        platform_file = work / f"cpython3{minor}.json"
        platform_file.write_text(json.dumps(complete_platform(minor), sort_keys=True))
        command += ["--complete-platform", str(platform_file)]
    if constraints is not None:
        command += ["--constraints", str(constraints)]
    for name in local_names:
        # Never take these from PyPI: a same-named project there must not win.
        command += ["--source", f"local={name}"]
    run_command([*command, *requirements], what=f"pex building {output.name}")


def pex_environment(work: Path, **extra: str) -> dict[str, str]:
    """Environment for running a freshly built pex at build time, away from the user's caches."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PEX_", "INFERNO_"))}
    env["PEX_ROOT"] = str(work / "pex-root")
    env.update(extra)
    return env


def discover_roles(pex: Path, work: Path) -> tuple[dict[str, RoleInfo], list[str]]:
    """Load the plugin manager inside ``pex`` and map each role to its providing module."""
    script, result = work / "discover_roles.py", work / "roles.json"
    script.write_text(DISCOVER_ROLES)
    env = pex_environment(work, PEX_INTERPRETER="1")
    run_command(
        [sys.executable, str(pex), str(script), str(result)],
        what="loading the plugins inside the pex",
        env=env,
    )
    data = json.loads(result.read_text())
    roles = {
        name: RoleInfo(name=name, module=info["module"], packages=tuple(info["packages"]))
        for name, info in data["roles"].items()
    }
    return roles, list(data["failures"])


def wheel_content(path: Path) -> WheelContent:
    """Read the top-level packages and ``inferno`` entry points of a wheel."""
    name, version = wheel_name_version(path)
    with zipfile.ZipFile(path) as wheel:
        names = wheel.namelist()
        tops = {top for top in map(file_top_level, names) if top}
        entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        ep_tops = set()
        for member in entry_points:
            parser = read_entry_points(wheel.read(member))
            if parser.has_section(ENTRY_POINT_GROUP):
                ep_tops |= {top_level(v) for _, v in parser.items(ENTRY_POINT_GROUP)}
    return WheelContent(path, name, version, frozenset(tops), frozenset(ep_tops))


def file_top_level(member: str) -> str | None:
    """The import package a wheel member belongs to; ``None`` for metadata and scripts."""
    parts = member.split("/")
    if parts[0].endswith(".dist-info") or member.endswith("/"):
        return None
    if parts[0].endswith(".data"):
        if len(parts) > 3 and parts[1] in ("purelib", "platlib"):
            parts = parts[2:]
        else:
            return None
    head = parts[0]
    return head.split(".", 1)[0] if len(parts) == 1 else head


def read_entry_points(data: bytes) -> configparser.ConfigParser:
    """Parse ``entry_points.txt`` keeping names' case."""
    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read_string(data.decode("utf-8"))
    return parser


@dataclasses.dataclass(frozen=True, slots=True)
class RolePlan:
    """What a role's pex takes from the plugin-carrying wheels of the full pex."""

    drop: frozenset[str]  # import packages of other roles' plugins
    copied: frozenset[str]  # wheels taken as they are
    rewritten: frozenset[str]  # wheels taken without the dropped packages
    dropped: frozenset[str]  # wheels left out: everything in them is dropped

    @property
    def local(self) -> frozenset[str]:
        """Projects resolved only from the role's wheelhouse, never from PyPI."""
        return self.copied | self.rewritten | self.dropped


def plan_role(
    role: RoleInfo, roles: dict[str, RoleInfo], wheels: Sequence[WheelContent]
) -> RolePlan:
    """Decide what a role's pex holds.

    A role's packages are the top-level package of the module that offers it
    and those its ``Role.packages`` names.  A role's pex leaves out the other
    roles' packages, unless this role needs them too; everything else stays,
    plugins that offer no role included (health checkers, engines, ...: a role
    may use any of them).  Wheels holding plugins or the core come from the
    full pex (rewritten when they hold a left-out package); the others
    (libraries) are resolved again, pinned to the full pex's versions, so a
    library only a left-out plugin needed is left out too.
    """
    keep = role.import_packages | {CORE_PACKAGE}
    others: set[str] = set()
    for other in roles.values():
        if other.name != role.name:
            others |= other.import_packages
    drop = frozenset(others - keep)
    plugin_packages = others | keep
    copied, rewritten, dropped = set(), set(), set()
    for wheel in wheels:
        if not (wheel.entry_point_tops or wheel.top_levels & plugin_packages):
            continue  # a library
        if not (wheel.top_levels | wheel.entry_point_tops) & drop:
            copied.add(wheel.name)
        elif wheel.top_levels and wheel.top_levels <= drop:
            dropped.add(wheel.name)
        else:
            rewritten.add(wheel.name)
    return RolePlan(drop, frozenset(copied), frozenset(rewritten), frozenset(dropped))


def local_label(role: str) -> str:
    """A PEP 440 local version label naming the role."""
    return re.sub(r"[^a-z0-9]+", ".", role.lower()).strip(".")


def rewrite_wheel(wheel: WheelContent, drop: frozenset[str], label: str, dest: Path) -> Path:
    """Write a copy of ``wheel`` without the ``drop`` packages and entry points naming them.

    The copy's version gets the local label ``+<role>`` so that it can never be
    mistaken for the published distribution, while ``name>=x`` still accepts it.
    """
    version = f"{wheel.version}.{label}" if "+" in wheel.version else f"{wheel.version}+{label}"
    files: dict[str, bytes] = {}
    with zipfile.ZipFile(wheel.path) as source:
        old_info = next(
            n.split("/")[0] for n in source.namelist() if n.endswith(".dist-info/METADATA")
        )
        dist_name = old_info[: -len(".dist-info")].rsplit("-", 1)[0]
        new_info = f"{dist_name}-{version}.dist-info"
        for member in source.namelist():
            if member.endswith("/") or file_top_level(member) in drop:
                continue
            data = source.read(member)
            head, _, rest = member.partition("/")
            if head == old_info:
                if rest == "RECORD":
                    continue
                if rest == "METADATA":
                    data = re.sub(
                        rb"(?m)^Version: .*$", f"Version: {version}".encode(), data, count=1
                    )
                if rest == "entry_points.txt":
                    data = filter_entry_points(data, drop)
                    if not data:
                        continue
                member = f"{new_info}/{rest}"
            files[member] = data
    record = io.StringIO()
    for member, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.write(f"{member},sha256={digest},{len(data)}\n")
    record.write(f"{new_info}/RECORD,,\n")
    files[f"{new_info}/RECORD"] = record.getvalue().encode()
    tags = wheel.path.name[: -len(".whl")].split("-")[2:]
    target = dest / ("-".join([dist_name, version, *tags]) + ".whl")
    write_zip(target, files)
    return target


def filter_entry_points(data: bytes, drop: frozenset[str]) -> bytes:
    """``entry_points.txt`` without the entries whose module is in a dropped package."""
    parser = read_entry_points(data)
    out = io.StringIO()
    for section in parser.sections():
        kept = [(k, v) for k, v in parser.items(section) if top_level(v) not in drop]
        if kept:
            out.write(f"[{section}]\n")
            out.writelines(f"{k} = {v}\n" for k, v in kept)
            out.write("\n")
    return out.getvalue().encode()


def write_zip(path: Path, files: dict[str, bytes]) -> None:
    """A zip with fixed timestamps and order: the same files give the same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        # Metadata last, RECORD at the very end, as wheels are laid out.
        for member in sorted(files, key=lambda m: (".dist-info/" in m, m.endswith("/RECORD"), m)):
            info = zipfile.ZipInfo(member, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, files[member])


def read_pex_info(pex: Path) -> dict[str, object]:
    """The PEX-INFO of a built pex (the zip reader skips the ``/bin/sh`` header)."""
    with zipfile.ZipFile(pex) as archive:
        info: dict[str, object] = json.loads(archive.read("PEX-INFO"))
    return info


def role_requirements(
    requirements: Iterable[str], versions: dict[str, str], dropped: set[str]
) -> list[str]:
    """Map the full pex's requirements to a role's: rewritten wheels pinned, dropped ones gone."""
    result = []
    for requirement in requirements:
        match = REQUIREMENT.match(requirement)
        if not match:
            raise BuildError(f"cannot read the requirement {requirement!r}")
        name = canonical_name(match["name"])
        if name in dropped:
            continue
        if name in versions:
            requirement = f"{match['name']}{match['extras'] or ''}=={versions[name]}"
            requirement += match["marker"] or ""
        result.append(requirement)
    return result


def check_absent(pex: Path, packages: frozenset[str]) -> None:
    """Guard: a role's pex must not contain another role's plugin package."""
    with zipfile.ZipFile(pex) as archive:
        present = {
            top
            for member in archive.namelist()
            if member.startswith(".deps/")
            for top in [file_top_level("/".join(member.split("/")[2:]))]
            if top in packages
        }
    if present:
        raise BuildError(f"{pex.name} still contains {', '.join(sorted(present))}")


def build_role_pexes(full_pex: Path, roles: Sequence[str], work: Path) -> list[Path]:
    """Write ``inferno-<role>.pex`` for each role into ``work``; unknown role: exit status 2.

    Each role's pex is resolved like the full one, except that projects holding
    plugin packages (or the core) come only from a wheelhouse of copies of the
    full pex's wheels, rewritten without the other roles' packages, and every
    other project is pinned to the version in the full pex.
    """
    known, failures = discover_roles(full_pex, work)
    for failure in failures:
        print(f"build_pex: warning: a plugin failed to load in the pex: {failure}", file=sys.stderr)
    unknown = [r for r in roles if r not in known]
    if unknown:
        raise BuildError(
            f"unknown role(s): {', '.join(unknown)}; "
            f"roles in this build: {', '.join(sorted(known)) or 'none'}",
            EXIT_USAGE,
        )
    # pex extracts what the running interpreter would use: every plugin wheel, which is
    # all that is taken from here (libraries are resolved again for every CPython minor).
    extracted = work / "wheels-all"
    run_command(
        [sys.executable, str(full_pex), "repository", "extract", "-f", str(extracted)],
        what="extracting the wheels of the pex",
        env=pex_environment(work, PEX_TOOLS="1"),
    )
    wheels = [wheel_content(path) for path in sorted(extracted.glob("*.whl"))]
    info = read_pex_info(full_pex)
    pinned = dict(wheel_name_version(Path(f)) for f in info["distributions"])  # type: ignore[attr-defined]
    requirements = [str(r) for r in info["requirements"]]  # type: ignore[attr-defined]
    outputs = []
    for name in roles:
        plan = plan_role(known[name], known, wheels)
        repo = work / f"wheels-{name}"
        repo.mkdir()
        versions = {}
        for wheel in wheels:
            if wheel.name in plan.copied:
                shutil.copyfile(wheel.path, repo / wheel.path.name)
            elif wheel.name in plan.rewritten:
                new = rewrite_wheel(wheel, plan.drop, local_label(name), repo)
                versions[wheel.name] = wheel_name_version(new)[1]
        constraints = work / f"constraints-{name}.txt"
        constraints.write_text(
            "".join(f"{p}=={v}\n" for p, v in sorted(pinned.items()) if p not in plan.local)
        )
        output = work / f"inferno-{name}.pex"
        build_pex(
            output,
            role_requirements(requirements, versions, set(plan.dropped)),
            work=work,
            find_links=repo,
            local_names=sorted(plan.local),
            constraints=constraints,
        )
        check_absent(output, plan.drop)
        outputs.append(output)
    return outputs


def describe(path: Path) -> str:
    """``path  size  sha256`` for the build log."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    return f"{path}  {len(data)} bytes ({len(data) / 2**20:.1f} MiB)  sha256 {digest}"


def build(options: Options) -> list[Path]:
    """Build everything asked for; nothing is written to ``--out`` unless all of it succeeds."""
    check_environment()
    options.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=options.out) as tmp:
        work = Path(tmp)
        wheelhouse = work / "wheels"
        wheelhouse.mkdir()
        requirements, local_names = local_distributions(options.extras, wheelhouse)
        full = work / "inferno.pex"
        build_pex(full, requirements, work=work, find_links=wheelhouse, local_names=local_names)
        built = [full, *build_role_pexes(full, options.roles, work)] if options.roles else [full]
        written = []
        for path in built:
            target = options.out / path.name
            os.replace(path, target)
            written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    options = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        written = build(options)
    except BuildError as exc:
        print(f"build_pex: error: {exc}", file=sys.stderr)
        return exc.status
    for path in written:
        print(describe(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
