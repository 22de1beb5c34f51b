"""scripts/gpu_wheels.py: the wheels carried to the GPU machines (which reach no registry) are
derived from what fxtrain imports and requires, less what the machines have; ``check`` names what
is missing or too old there. No network: nothing here downloads."""

import ast
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_wheels.py"
ABSENT = "not-a-distribution-fxtrain-planted"


def _script():
    """scripts/gpu_wheels.py as a module."""
    spec = importlib.util.spec_from_file_location("gpu_wheels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu = _script()


def run(*args):
    """The script run by this interpreter, as a command: (exit status, stdout)."""
    done = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    return done.returncode, done.stdout


@pytest.fixture(scope="module")
def listed():
    """``gpu_wheels.py list``'s answer: normalised name -> version."""
    status, out = run("list")
    assert status == 0, out
    return dict(line.split("==") for line in out.splitlines())


@pytest.fixture(scope="module")
def machine():
    return gpu.machine_packages()


def test_the_list_carries_what_fxtrain_needs_and_nothing_the_machine_has(listed, machine):
    assert {"optree", "tensorboardx", "jsonargparse"} <= set(listed)
    assert {"docstring-parser", "typeshed-client"} <= set(listed)  # jsonargparse[signatures]
    assert not set(listed) & machine
    derived = {n: v for n, v in listed.items() if n not in gpu.PINNED}
    assert all(importlib.metadata.version(n) == v for n, v in derived.items())  # as tested here


def test_what_only_the_gpu_runs_is_carried_pinned_with_its_needs_on_the_machine(listed,
                                                                                 machine):
    """liger-kernel (CUDA only, not installed here): at its pinned version, and what its wheel
    requires (torch, triton) is the machine's."""
    for name, (version, requires, _) in gpu.PINNED.items():
        assert listed[name] == version and name not in machine
        assert set(requires) <= machine, name


def test_a_module_that_needs_a_missing_extra_is_reported_not_fatal(tmp_path, monkeypatch, capfd):
    package = tmp_path / "planted_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "uses.py").write_text("import packaging.version\n")
    (package / "extra.py").write_text(f"import {ABSENT.replace('-', '_')}\n")
    (package / "__main__.py").write_text("raise SystemExit(3)\n")  # a command line: not run
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    modules = gpu.imported_modules("planted_pkg", ["nbformat"])
    assert {"planted_pkg.uses", "packaging.version", "nbformat"} <= set(modules)
    assert "os" not in modules and "planted_pkg.__main__" not in modules
    assert "planted_pkg.extra: not imported" in capfd.readouterr().err
    assert set(gpu.distributions_of(modules)) >= {"packaging", "nbformat"}


def test_a_shared_top_level_name_goes_to_the_distribution_that_provides_the_loaded_module():
    # `google` is protobuf's, google-auth's and googleapis-common-protos' top-level name here
    found = gpu.distributions_of(["google", "google.protobuf", "google.protobuf.message", "yaml"])
    assert found == {"protobuf": ["google"], "pyyaml": ["yaml"]}


def module_level_imports(source: str) -> set[str]:
    """The top-level names of the absolute imports a module runs when imported: its body's and
    its ``if`` blocks' (not under ``if TYPE_CHECKING``), not in ``try``, functions or classes."""
    names: set[str] = set()

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.Import):
                names.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.partition(".")[0])
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)

    visit(ast.parse(source).body)
    return names


def test_every_module_level_import_of_fxtrain_is_on_the_machine_or_carried(listed, machine):
    """An independent look: the imports read from fxtrain's source, not run."""
    tops = set().union(*(module_level_imports(p.read_text())
                         for p in (ROOT / "fxtrain").rglob("*.py")))
    third_party = tops - set(sys.stdlib_module_names) - {"fxtrain", "__future__"}
    assert {"torch", "optree"} <= third_party
    owners = importlib.metadata.packages_distributions()
    for name in sorted(third_party):
        distributions = {gpu.normalised(d) for d in owners.get(name, [])}
        assert distributions, f"fxtrain imports {name}, of no installed distribution"
        assert distributions & (machine | set(listed)), \
            f"fxtrain imports {name} ({', '.join(distributions)}): neither on the GPU machine " \
            "nor carried by scripts/gpu_wheels.py list"


def test_a_planted_module_or_requirement_is_carried_with_what_it_requires(machine):
    requirements = gpu.pyproject_requirements()
    before = gpu.carried([], requirements, machine)
    assert "nbformat" not in before and "mkdocs" not in before
    by_import = gpu.carried(["nbformat", "nbformat.v4"], requirements, machine)
    assert by_import["nbformat"] == (importlib.metadata.version("nbformat"), "imports nbformat")
    assert "fastjsonschema" in by_import  # nbformat's own requirement, not on the machine
    by_requirement = gpu.carried([], [*requirements, "mkdocs>=1"], machine)
    assert by_requirement["mkdocs"][1] == "pyproject" and set(before) < set(by_requirement)


def test_the_closure_follows_extras_and_the_machines_markers_and_stops_at_the_machine(machine):
    plain = gpu.closure([("jsonargparse", "x")], machine)
    assert set(plain) == {"jsonargparse"}
    signatures = gpu.closure([("jsonargparse[signatures]", "x")], machine)
    assert set(signatures) == {"jsonargparse", "docstring-parser", "typeshed-client"}
    # markers are the GPU machine's (Python 3.12), not this interpreter's
    assert gpu.closure([('nbformat; python_version < "3.12"', "x")], machine) == {}
    assert "nbformat" in gpu.closure([('nbformat; python_version >= "3.12"', "x")], machine)
    # a machine package's requirements are the machine's business
    assert gpu.closure([("transformers", "x")], machine) == {}
    with pytest.raises(gpu.NotInstalled, match=ABSENT):
        gpu.closure([(f"{ABSENT}>=1", "x")], machine)


def test_check_passes_here_and_names_what_is_missing_or_too_old(capsys):
    status, out = run("check")
    assert status == 0, out
    lines = out.splitlines()
    for name in ("optree", "tensorboardx", "jsonargparse", "docstring-parser"):
        assert any(line.startswith(f"ok {name} ") for line in lines), name
    assert lines[-1].startswith("fxtrain ") and str(ROOT / "fxtrain") in lines[-1]

    assert gpu.main(["check", "--require", f"{ABSENT}>=1", "--require", "numpy<1"]) == 1
    out = capsys.readouterr().out
    assert f"MISSING {ABSENT}" in out.splitlines()
    assert f"WRONG numpy {importlib.metadata.version('numpy')}, needs <1" in out.splitlines()


def test_prune_keeps_one_version_of_each_pinned_wheel(tmp_path):
    names = ["optree-0.20.0-cp312-cp312-manylinux_2_28_x86_64.whl",
             "optree-0.19.0-cp312-cp312-manylinux_2_28_x86_64.whl",
             "tensorboardX-2.6.5-py3-none-any.whl", "stray-1.0-py3-none-any.whl"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    removed = gpu.prune(tmp_path, {"optree": "0.20.0", "tensorboardx": "2.6.5"})
    assert removed == [names[1], names[3]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[0], names[2]])


def test_download_retries_for_a_newer_glibc_and_refuses_over_60_mib(tmp_path, monkeypatch):
    calls = []

    def pip(command):
        """pip download, faked: no wheel for a pin until the newer glibc, a 61 MiB one then."""
        calls.append(command)
        name, version = command[-1].split("==")
        if "manylinux_2_35_x86_64" not in command:
            return subprocess.CompletedProcess(command, 1)
        with open(tmp_path / f"{name}-{version}-cp312-cp312-manylinux_2_35_x86_64.whl", "wb") as f:
            f.truncate(61 * 2**20)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(gpu.subprocess, "run", pip)
    assert gpu.download(tmp_path, {"big": "1.0"}) == 1
    assert len(calls) == 2 and "--only-binary=:all:" in calls[0]
    assert calls[0][calls[0].index("--python-version") + 1] == "3.12"
    assert gpu.MAX_BYTES < 61 * 2**20
