"""The package's floors: a module imports only modules on its own floor or below (read from the
source with ``ast``, so a lazy import inside a function counts too)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fxtrain"
# bottom to top; a module's floor is that of the longest name here that it starts with
FLOORS = (
    # tensors, trees and numbers: no training concept at all
    ("_version", "struct", "donation", "tree", "stats", "means", "random", "distributed",
     "traced_errors",
     "sharding", "preemption", "logging.numbers"),
    # the pieces: optimizers, metrics, writers, checkpoints, moving batches, the callback protocol
    ("optim", "metrics", "logging", "checkpoint", "unguarded", "feed", "callbacks.core",
     "callbacks.combinators"),
    # the state, and the trained module out of it
    ("state", "precision", "export"),
    # the callback catalogue: what a step or a loop folds over the state (never the step itself)
    ("callbacks",),
    # the step and what runs it or reads it
    ("step", "graphs", "data", "evaluation", "predict"),
    # the loop, and the tools that look at steps and loops
    ("loop", "debug"),
    # the applications and the public surface
    ("demo", "cli", "__init__", "__main__"),
)


def floor_of(module: str) -> int:
    """The floor of ``module`` (a dotted name relative to the package)."""
    best = max(((len(name), i) for i, names in enumerate(FLOORS) for name in names
                if module == name or module.startswith(name + ".")), default=None)
    if best is None:
        raise AssertionError(f"fxtrain.{module} has no floor in tests/test_layers.py; add it")
    return best[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imported(path: Path) -> set[str]:
    """The fxtrain modules ``path`` imports, as dotted names relative to the package."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            name = ".".join([*base, *(node.module.split(".") if node.module else [])])
            if node.module:
                found.add(name)
            else:  # `from .. import x`: a module, or a name the package's __init__ defines
                for a in node.names:
                    sub = Path(PACKAGE.parent, *name.split("."), a.name)
                    is_module = sub.with_suffix(".py").exists() or sub.is_dir()
                    found.add(f"{name}.{a.name}" if is_module else f"{name}.__init__")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {"__init__" if n == "fxtrain" else n.removeprefix("fxtrain.") for n in found
            if n == "fxtrain" or n.startswith("fxtrain.")}


def upward_imports(root: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        here = module_name(path)
        for name in sorted(imported(path)):
            if floor_of(name) > floor_of(here):
                out.append(f"fxtrain.{here} (floor {floor_of(here)}) imports fxtrain.{name} "
                           f"(floor {floor_of(name)})")
    return out


def test_no_module_imports_a_module_on_a_higher_floor():
    upward = upward_imports()
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("line", ["from ..callbacks.publish import loggable",
                                  "from .. import loop", "import fxtrain.step",
                                  "from .. import __version__"])
def test_a_planted_upward_import_is_caught(tmp_path, line):
    fake = tmp_path / "fxtrain"
    (fake / "logging").mkdir(parents=True)
    (fake / "logging" / "values.py").write_text(line + "\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, fake
    try:
        found = upward_imports(fake)
    finally:
        PACKAGE = saved
    assert len(found) == 1 and found[0].startswith("fxtrain.logging.values"), found


def test_the_import_reader_sees_relative_imports():
    names = imported(PACKAGE / "callbacks" / "publish.py")
    assert "logging.numbers" in names and "distributed" in names
    assert floor_of("callbacks.core") < floor_of("state") < floor_of(
        "callbacks.log_metrics") < floor_of("step") < floor_of("loop")
