"""The purity review's measures of fxtrain's source, counted from its syntax tree (issue 76):

- ``module tables``: module-level names bound to a mutable container (a list, dict or set
  literal or call) or to a ``ContextVar``, and written at run time (a ``global`` statement, an
  item or attribute assignment, or a mutating method call on the name inside a function);
- ``ContextVars``: ``ContextVar(...)`` made;
- ``run while tracing``: functions decorated ``@run_while_tracing`` (Dynamo calls them for real
  while it traces, their result a constant to the graph);
- ``is_compiling``: ``torch.compiler.is_compiling()`` calls;
- ``one_step`` and ``apply_gradients``: the code lines of those two functions (no docstring, no
  blank or comment-only lines).

    python scripts/purity_counts.py            # this checkout
    python scripts/purity_counts.py --json     # the same, one JSON object
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "fxtrain"
_MUTATORS = {"append", "extend", "insert", "pop", "popitem", "clear", "update", "setdefault",
             "add", "discard", "remove", "set", "reset", "__setitem__"}


def _is_table(value: ast.expr) -> bool:
    if isinstance(value, (ast.List, ast.Dict, ast.Set)):
        return True
    if isinstance(value, ast.Call):
        name = value.func.attr if isinstance(value.func, ast.Attribute) else getattr(
            value.func, "id", "")
        return name in {"list", "dict", "set", "defaultdict", "OrderedDict", "ContextVar",
                        "WeakKeyDictionary", "WeakValueDictionary", "WeakSet", "deque"}
    return False


def _tables(tree: ast.Module) -> set[str]:
    """Module-level table names of ``tree`` written inside one of its functions."""
    names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else [])
        value = getattr(node, "value", None)
        if value is not None and _is_table(value):
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    written = set()
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Global):
                written.update(n for n in node.names if n in names)
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                    base = t.value if isinstance(t, (ast.Subscript, ast.Attribute)) else None
                    if isinstance(base, ast.Name) and base.id in names:
                        written.add(base.id)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id in names and \
                    node.func.attr in _MUTATORS:
                written.add(node.func.value.id)
    return written


def _code_lines(fn: ast.FunctionDef, source: list[str]) -> int:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    lines = source[body[0].lineno - 1:fn.end_lineno] if body else []
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


def counts(root: Path = ROOT) -> dict[str, int]:
    found = {"module tables": 0, "ContextVars": 0, "run while tracing": 0, "is_compiling": 0,
             "one_step lines": 0, "apply_gradients lines": 0}
    tables = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        written = _tables(tree)
        tables += [f"{path.relative_to(root.parent)}:{name}" for name in sorted(written)]
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(
                    node.func, "id", "")
                found["ContextVars"] += name == "ContextVar"
                found["is_compiling"] += name == "is_compiling"
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found["run while tracing"] += any(
                    getattr(d, "id", getattr(d, "attr", "")) == "run_while_tracing"
                    for d in node.decorator_list)
                if node.name in ("one_step", "apply_gradients"):
                    found[f"{node.name} lines"] += _code_lines(node, source.splitlines())
    found["module tables"] = len(tables)
    found["tables"] = tables
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    found = counts()
    if parser.parse_args().json:
        print(json.dumps(found))
        return
    for key, value in found.items():
        if key != "tables":
            print(f"{key:24} {value}")
    for table in found["tables"]:
        print(f"  {table}")


if __name__ == "__main__":
    main()
