"""The package's floors: a lower module never imports a higher one (read from the source)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fxtrain"
# each floor and the modules above it that it must never import
ABOVE = {"logging": ("callbacks", "step", "loop", "checkpoint", "demo", "cli"),
         "checkpoint": ("callbacks", "step", "loop", "demo", "cli")}


def imported(path: Path) -> set[str]:
    """The fxtrain modules ``path`` imports, as dotted names relative to the package."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            name = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names = [f"{name}.{a.name}" for a in node.names] if not node.module else [name]
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {n.removeprefix("fxtrain.") for n in found if n.startswith("fxtrain")}


@pytest.mark.parametrize("floor", list(ABOVE))
def test_a_floor_never_imports_a_module_above_it(floor):
    upward = [f"{path.relative_to(PACKAGE)} imports fxtrain.{name}"
              for path in sorted((PACKAGE / floor).rglob("*.py")) for name in imported(path)
              if name.split(".")[0] in ABOVE[floor]]
    assert not upward, "\n".join(upward)


def test_the_import_reader_sees_relative_imports():
    names = imported(PACKAGE / "callbacks" / "report.py")
    assert "logging.numbers" in names and "distributed" in names
