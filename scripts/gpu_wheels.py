"""Wheels for the GPU machines, which reach no package registry.

The GPU image ('cuda': Python 3.12.3, torch 2.11.0+cu130) has the distributions listed in
benchmarks/gpu/machine_packages.txt. What fxtrain needs beyond them travels there as wheels,
downloaded here, where pip reaches a registry:

  list [--why]      the distributions to carry, ``name==version``: what importing every fxtrain
                    module (and transformers, for benchmarks/gpu_transformer.py) loads, and
                    pyproject's dependencies, with what they require on the machine's Python and
                    platform, less the machine's list; at the versions installed here (what the
                    suite tested). And ``PINNED``: what fxtrain imports only when it is used
                    (torchao, for precision='fp8') or only the GPU runs (liger-kernel, whose
                    Triton kernels need CUDA), at its pinned version. ``--why`` says, after a
                    ``#``, what needs each.
  download DIR      ``list``'s wheels for CPython 3.12 on manylinux x86_64 into DIR, and only
                    those; refused over 60 MiB (a device call carries 64 MiB with the tree)
  check [--require SPEC ...]
                    on the GPU machine, once the wheels are installed: every requirement of
                    pyproject's dependencies, and what the installed ones require in turn, is
                    installed at a version that satisfies it; and where ``import fxtrain`` is from

``check`` runs on the machine's python3, so only the standard library and ``packaging`` (imported
where it is used) are assumed.

Run: python scripts/gpu_wheels.py download .gpu-wheels           (here)
     python3 -m pip install --no-index --no-deps .gpu-wheels/*.whl (on the machine)
     python3 scripts/gpu_wheels.py check                          (on the machine)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata as metadata
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
MACHINE_LIST = ROOT / "benchmarks" / "gpu" / "machine_packages.txt"
# what benchmarks/gpu_transformer.py imports besides fxtrain
BENCHMARK_MODULES = ("transformers",)
# the GPU machines' environment markers (PEP 508): requirements are resolved for it, not for here
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
# tried when no wheel matches PLATFORMS: wheels built for a newer glibc (the image's is newer)
NEWER_GLIBC = (24, 31, 34, 35)
MAX_BYTES = 60 * 2**20
# carried at a pinned version, not derived: nothing that importing fxtrain's modules loads
# (liger-kernel: CUDA only, not installed here; torchao: imported when a model is converted).
# name -> (version, what its wheel requires (Requires-Dist, extras aside): the machine has
# each, checked by tests/tools/test_gpu_wheels.py, why)
PINNED = {"liger-kernel": ("0.8.5", ("torch", "triton"),
                           "fx.losses.chunked_causal_lm(impl='liger'), the kit's fx_liger"),
          "torchao": ("0.18.0", (), "precision='fp8' (fx.precision.float8): float8 matrix "
                      "products on the GPU; imported only when a model is converted")}


class NotInstalled(LookupError):
    """A distribution that must be carried is not installed here, so it has no tested version."""


def normalised(name: str) -> str:
    """A distribution's name as PEP 503 compares it (``Ml_Dtypes`` and ``ml-dtypes`` are one)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def machine_packages(path: Path = MACHINE_LIST) -> frozenset[str]:
    """The distributions preinstalled on the GPU machines: the list's names, without comments."""
    lines = (line.partition("#")[0].strip() for line in path.read_text().splitlines())
    return frozenset(normalised(line) for line in lines if line)


def pyproject_requirements(path: Path = PYPROJECT) -> list[str]:
    """pyproject's ``[project] dependencies``: what every install of fxtrain needs."""
    return list(tomllib.loads(path.read_text())["project"]["dependencies"])


# ---- what fxtrain imports ----------------------------------------------------------------------

def import_everything(package: str, extra_modules: Iterable[str]) -> list[str]:
    """Imports every module of ``package`` and ``extra_modules``; the non-stdlib modules loaded.

    A module that fails with ModuleNotFoundError (an optional extra not installed) is reported on
    stderr and skipped; any other failure propagates. ``__main__`` modules are not imported (they
    run a command line). Run in a process of its own: it loads everything."""
    import pkgutil

    def report(name: str, error: BaseException | None = None) -> None:
        print(f"{name}: not imported ({error or 'its package failed'})", file=sys.stderr)

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the answer only
        root = importlib.import_module(package)
        for module in pkgutil.walk_packages(root.__path__, package + ".", onerror=report):
            if module.name.rpartition(".")[2] == "__main__":
                continue
            try:
                importlib.import_module(module.name)
            except ModuleNotFoundError as error:
                report(module.name, error)
        for name in extra_modules:
            importlib.import_module(name)
    return sorted(m for m in sys.modules if m.partition(".")[0] not in sys.stdlib_module_names)


def imported_modules(package: str = "fxtrain", extra_modules: Iterable[str] = BENCHMARK_MODULES,
                     python: str = sys.executable) -> list[str]:
    """The modules loaded by :func:`import_everything`, run in a subprocess of ``python``."""
    command = [python, str(Path(__file__).resolve()), "imports", package, *extra_modules]
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
    return done.stdout.split()


def provided_modules(distribution: str) -> set[str]:
    """The module names a distribution's installed files provide (``a/b/__init__.py`` is
    ``a.b``, ``a/c.cpython-311-x86_64-linux-gnu.so`` is ``a.c``)."""
    names = set()
    for file in metadata.distribution(distribution).files or ():
        parts = file.parts
        if not parts or not parts[-1].endswith((".py", ".so", ".pyd")):
            continue
        stem = parts[-1].partition(".")[0]
        names.add(".".join(parts[:-1] if stem == "__init__" else (*parts[:-1], stem)))
    return names


def distributions_of(modules: Iterable[str]) -> dict[str, list[str]]:
    """The distributions that provide ``modules``: normalised name -> its top-level modules.

    A top-level name several distributions share (``google``: protobuf, google-auth, ...) goes
    to those whose files provide one of the loaded modules under it. Modules of no distribution
    (the interpreter's own, a script's neighbours) are left out."""
    modules = set(modules)
    owners = metadata.packages_distributions()
    found: dict[str, list[str]] = {}
    for top in sorted({m.partition(".")[0] for m in modules}):
        candidates = owners.get(top, [])
        if len(candidates) > 1:
            under = {m for m in modules if m == top or m.startswith(top + ".")}
            candidates = [d for d in candidates if provided_modules(d) & under]
        for distribution in candidates:
            found.setdefault(normalised(distribution), []).append(top)
    return found


# ---- what the requirements need ---------------------------------------------------------------

def applies(requirement, env: dict | None, extra: str = "") -> bool:
    """Whether a requirement applies in ``env`` (None: here), asked for by a distribution
    installed with ``extra`` ("": none)."""
    marker = requirement.marker
    return marker is None or marker.evaluate({**(env or {}), "extra": extra})


def closure(requirements: Iterable[tuple[str, str]], stop: frozenset[str] = frozenset(),
            env: dict | None = TARGET) -> dict[str, str]:
    """Every distribution ``requirements`` need, transitively, by ``Requires-Dist`` as installed
    here: normalised name -> why (the first thing that needed it).

    ``requirements`` are (PEP 508 string, why) pairs. A requirement's extras bring their own
    requirements (``jsonargparse[signatures]``: docstring-parser, typeshed-client); markers are
    evaluated for ``env`` (None: here). Distributions in ``stop`` are left out and not followed:
    the machine's own packages came with what their versions there require. Raises NotInstalled,
    naming them all, for the distributions needed that are not installed here."""
    from packaging.requirements import Requirement

    needed: dict[str, str] = {}
    missing: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    roots = [(Requirement(text), why) for text, why in requirements]
    todo = [(requirement, why) for requirement, why in roots if applies(requirement, env)]
    while todo:
        requirement, why = todo.pop(0)
        name = normalised(requirement.name)
        if name in stop:
            continue
        needed.setdefault(name, why)
        for extra in ("", *sorted(requirement.extras)):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            try:
                required = metadata.requires(name) or []
            except metadata.PackageNotFoundError:
                missing.setdefault(name, why)
                break
            todo += [(r, f"required by {name}") for r in map(Requirement, required)
                     if applies(r, env, extra)]
    if missing:
        raise NotInstalled("needed but not installed here: "
                           + ", ".join(f"{n} ({why})" for n, why in sorted(missing.items())))
    return needed


def carried(modules: Iterable[str], requirements: Iterable[str], machine: frozenset[str],
            project: str = "fxtrain") -> dict[str, tuple[str, str]]:
    """What the GPU machines need beyond ``machine``: normalised name -> (version here, why).

    The distributions of the loaded ``modules`` (the project's own left out) and
    ``requirements``, with all they require on the machines (:func:`closure`)."""
    roots = [(name, "imports " + ", ".join(tops))
             for name, tops in distributions_of(modules).items() if name != normalised(project)]
    roots += [(text, "pyproject") for text in requirements]
    return {name: (metadata.version(name), why)
            for name, why in sorted(closure(roots, stop=machine).items())}


def derived(machine_list: Path = MACHINE_LIST) -> dict[str, tuple[str, str]]:
    """``list``'s answer: what importing fxtrain loads and pyproject's dependencies need, and
    ``PINNED``."""
    found = carried(imported_modules(), pyproject_requirements(), machine_packages(machine_list))
    return {**found, **{name: (version, why) for name, (version, _, why) in PINNED.items()}}


# ---- download ----------------------------------------------------------------------------------

def pip_download(pin: str, folder: Path, newer_glibc: Iterable[int] = ()) -> list[str]:
    """The pip command that downloads ``pin``'s wheel for the GPU machines into ``folder``."""
    platforms = [*PLATFORMS, *(f"manylinux_2_{n}_x86_64" for n in newer_glibc)]
    return [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
            "--python-version", "3.12", "--implementation", "cp",
            *(arg for p in platforms for arg in ("--platform", p)), "-d", str(folder), pin]


def wheel_pin(filename: str) -> tuple[str, str]:
    """A wheel file's (normalised name, normalised version), from its name (PEP 427)."""
    from packaging.utils import canonicalize_version, parse_wheel_filename

    name, version, _, _ = parse_wheel_filename(filename)
    return str(name), canonicalize_version(version)


def prune(folder: Path, pins: dict[str, str]) -> list[str]:
    """Removes the wheels in ``folder`` not pinned (other packages, other versions); their names."""
    from packaging.utils import canonicalize_version

    keep = {(normalised(name), canonicalize_version(v)) for name, v in pins.items()}
    stale = [w for w in sorted(folder.glob("*.whl")) if wheel_pin(w.name) not in keep]
    for wheel in stale:
        wheel.unlink()
    return [w.name for w in stale]


def download(folder: Path, pins: dict[str, str]) -> int:
    """Downloads each pin's wheel into ``folder`` (again for a newer glibc where none matched),
    removes the others; exit status: 1 when one is missing or they pass MAX_BYTES."""
    folder.mkdir(parents=True, exist_ok=True)
    failed = []
    for name, version in pins.items():
        pin = f"{name}=={version}"
        if subprocess.run(pip_download(pin, folder)).returncode != 0:
            print(f"retrying {pin} for glibc 2.{'/2.'.join(map(str, NEWER_GLIBC))}",
                  file=sys.stderr)
            if subprocess.run(pip_download(pin, folder, NEWER_GLIBC)).returncode != 0:
                failed.append(pin)
    for removed in prune(folder, pins):
        print(f"removed {removed}")
    wheels = sorted(folder.glob("*.whl"))
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    total = sum(w.stat().st_size for w in wheels)
    print(f"{total / 2**20:8.2f} MiB  in all, {len(wheels)} wheels in {folder}")
    if failed:
        print("no wheel for the GPU machines: " + ", ".join(failed), file=sys.stderr)
    if total > MAX_BYTES:
        print(f"over {MAX_BYTES / 2**20:.0f} MiB: a device call carries 64 MiB with the tree",
              file=sys.stderr)
    return 1 if failed or total > MAX_BYTES else 0


# ---- check (on the GPU machine) ---------------------------------------------------------------

def verdict(requirement, why: str = "") -> str:
    """``ok name version``, ``MISSING name`` or ``WRONG name version, needs spec``, for one
    requirement against what is installed (``why``, when given, is appended in brackets)."""
    name = normalised(requirement.name)
    after = f" ({why})" if why else ""
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        return f"MISSING {name}{after}"
    if not requirement.specifier.contains(version, prereleases=True):
        return f"WRONG {name} {version}, needs {requirement.specifier}{after}"
    return f"ok {name} {version}{after}"


def checked(requirements: Iterable[str]) -> list[str]:
    """One :func:`verdict` per requirement that applies here, and per requirement of what is
    installed, transitively (their extras' too), each distinct requirement once."""
    from packaging.requirements import Requirement

    lines: list[str] = []
    seen_requirements: set[str] = set()
    seen: set[tuple[str, str]] = set()
    roots = map(Requirement, requirements)
    todo = [(requirement, "") for requirement in roots if applies(requirement, None)]
    while todo:
        requirement, why = todo.pop(0)
        if str(requirement) in seen_requirements:
            continue
        seen_requirements.add(str(requirement))
        lines.append(verdict(requirement, why))
        if not lines[-1].startswith("ok"):
            continue
        name = normalised(requirement.name)
        for extra in ("", *sorted(requirement.extras)):
            if (name, extra) not in seen:
                seen.add((name, extra))
                required = map(Requirement, metadata.requires(name) or [])
                todo += [(r, f"by {name}") for r in required if applies(r, None, extra)]
    return lines


def fxtrain_origin() -> str:
    """``fxtrain VERSION from PATH``, once its whole public API is imported (``import fxtrain``
    alone imports nothing: its names load on first use). Installed, or else this checkout."""
    try:
        import fxtrain
        where = ""
    except ModuleNotFoundError as error:
        if error.name != "fxtrain":
            raise
        sys.path.insert(0, str(ROOT))
        import fxtrain
        where = " (the checkout: fxtrain is not installed)"
    fxtrain.fit  # noqa: B018 - the first public name imports every public module
    return f"fxtrain {fxtrain.__version__} from {Path(fxtrain.__file__).parent}{where}"


def check(requirements: Iterable[str]) -> int:
    """Prints :func:`checked`'s lines and where fxtrain is imported from; 1 on any problem."""
    lines = checked(requirements)
    print("\n".join(lines))
    problems = [line for line in lines if not line.startswith("ok")]
    try:
        print(fxtrain_origin())
    except Exception as error:  # noqa: BLE001 - any failure to import is the answer
        problems.append(f"import fxtrain failed: {error!r}")
        print(problems[-1])
    if problems:
        print(f"{len(problems)} problem(s) of {len(lines)} requirements", file=sys.stderr)
    return 1 if problems else 0


# ---- command line ------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    """The command line: list, download DIR, check, and imports (list's subprocess)."""
    top = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    commands = top.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="the distributions to carry, name==version")
    listing.add_argument("--why", action="store_true", help="say what needs each, after a #")
    fetching = commands.add_parser("download", help="their wheels for the GPU machines")
    fetching.add_argument("folder", type=Path)
    checking = commands.add_parser("check", help="on the GPU machine: fxtrain's needs installed")
    checking.add_argument("--require", action="append", default=[], metavar="SPEC",
                          help="a requirement to check besides pyproject's (repeatable)")
    importing = commands.add_parser("imports", help="(list's subprocess) the modules loaded")
    importing.add_argument("package")
    importing.add_argument("modules", nargs="*")
    return top


def main(argv: list[str] | None = None) -> int:
    """Runs a command; its exit status."""
    args = parser().parse_args(argv)
    if args.command == "imports":
        print("\n".join(import_everything(args.package, args.modules)))
        return 0
    if args.command == "check":
        return check([*pyproject_requirements(), *args.require])
    try:
        pins = derived()
    except (NotInstalled, subprocess.CalledProcessError) as error:
        print(f"gpu_wheels: {error}", file=sys.stderr)
        return 1
    if args.command == "download":
        return download(args.folder, {name: version for name, (version, _) in pins.items()})
    for name, (version, why) in pins.items():
        print(f"{name}=={version}" + (f"  # {why}" if args.why else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
