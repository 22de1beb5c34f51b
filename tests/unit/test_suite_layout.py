"""The test suite's own layout: what test files share lives in the shared modules in tests/
(helpers.py, helpers_*.py, dist_worker.py, ...), never in a test module another imports (issue 76,
item 6). A test module is one pytest collects, and importing it from another file runs its
module-level code there and ties the two kinds' files together."""

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

# code a test hands to a child process as a string: ``from test_x import ...`` in it imports a test
# module there
IMPORT_IN_A_STRING = re.compile(r"^\s*(?:from\s+(test_\w*)[\s.]|import\s+(test_\w*))", re.M)


def imports_of_test_modules(path: Path, root: Path = TESTS.parent) -> list[str]:
    """``file:line: what`` for each import of a ``test_*`` module in ``path`` (named from
    ``root``): an import statement (at any depth), ``importlib.import_module`` or ``__import__``
    of a literal name, or an import in a string of code."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else \
                getattr(node.func, "id", "")
            if called in ("import_module", "__import__"):
                modules = [node.args[0].value]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            for match in IMPORT_IN_A_STRING.finditer(node.value):
                line = node.lineno + node.value.count("\n", 0, match.start())
                found.append((line, f"a string of code imports {match.group(1) or match.group(2)}"))
        found += [(node.lineno, f"imports {module}") for module in modules
                  if module.split(".")[0].startswith("test_")]
    return [f"{path.relative_to(root)}:{line}: {what}" for line, what in sorted(found)]


def test_no_file_of_the_suite_imports_a_test_module():
    files = sorted(TESTS.rglob("*.py"))
    assert any(p.name == "test_suite_layout.py" for p in files) and len(files) > 50
    found = [line for path in files for line in imports_of_test_modules(path)]
    assert not found, ("test modules import test modules; move what they share into a shared "
                       "module in tests/ (helpers.py, helpers_*.py) and import it from there:\n"
                       + "\n".join(found))


def test_the_check_finds_each_way_of_importing_a_test_module(tmp_path):
    planted = tmp_path / "tests" / "unit" / "test_planted.py"
    planted.parent.mkdir(parents=True)
    # "T_" is "test_" (written so, this file does not import a test module in a string itself)
    planted.write_text('import os\nfrom T_a import x\n\n\ndef f():\n    import T_b.c\n'
                       '    importlib.import_module("T_c")\n'
                       'CODE = """\nimport sys\nfrom T_d import y\n"""\n'
                       'from helpers_e import T_f\nimport latest_g\nfrom . import T_h\n'
                       .replace("T_", "test_"))
    path = Path("tests", "unit", "test_planted.py")
    assert imports_of_test_modules(planted, tmp_path) == [
        f"{path}:2: imports test_a", f"{path}:6: imports test_b.c", f"{path}:7: imports test_c",
        f"{path}:10: a string of code imports test_d"]
