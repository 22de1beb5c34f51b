"""The package's floors: a module imports only modules on its own floor or below (read from the
source with ``ast``, so a lazy import inside a function counts too)."""

import ast
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[2] / "fxtrain"
# bottom to top; a module's floor is that of the longest name here that it starts with
FLOORS = (
    # tensors and trees, randomness, processes and the run's layout over them, files, text, the
    # version and torch's internals
    ("_version", "_torch", "_format", "_files", "_held", "_memory", "struct", "donation", "tree",
     "stats", "random", "_keyed_attention", "_keyed_shards", "distributed", "sharding"),
    # the contract between the pieces: the callback protocol
    ("protocol",),
    # the pieces: optimizers, losses, metrics, data, writers, checkpoints
    ("optim", "losses", "metrics", "data", "logging", "checkpoint"),
    # the state, the step's precision policy, and the trained module out of the state
    ("state", "precision", "export"),
    # the callbacks: the combinators and the catalogue a step or a loop folds over the state
    ("callbacks",),
    # the step: made, checked, differentiated, run (K steps a call, CUDA graphs, precompiled)
    ("step",),
    # the loop and what runs steps over data (evaluate, predict, lr_find), the tools that look
    # at steps and loops
    ("loop", "debug"),
    # the applications (the demo, config runs, the command line) and the public surface
    ("apps", "cli", "__init__", "__main__"),
)


def floor_of(module: str) -> int:
    """The floor of ``module`` (a dotted name relative to the package)."""
    best = max(((len(name), i) for i, names in enumerate(FLOORS) for name in names
                if module == name or module.startswith(name + ".")), default=None)
    if best is None:
        raise AssertionError(f"fxtrain.{module} has no floor in tests/unit/test_layers.py; add it")
    return best[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imported(path: Path) -> set[str]:
    """The fxtrain modules ``path`` imports, as dotted names relative to the package, with the
    packages they are in (importing ``callbacks.core`` runs ``callbacks/__init__.py`` first),
    but not the packages ``path`` is in itself (those are imported before it anyway)."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            name = ".".join([*base, *(node.module.split(".") if node.module else [])])
            if node.module:
                found.add(name)
            for a in node.names:  # `from x import y`: y a module of x, or a name x defines
                sub = Path(PACKAGE.parent, *name.split("."), a.name)
                if sub.with_suffix(".py").exists() or sub.is_dir():
                    found.add(f"{name}.{a.name}")
                elif not node.module:
                    found.add(f"{name}.__init__")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    names = {"__init__" if n == "fxtrain" else n.removeprefix("fxtrain.") for n in found
             if n == "fxtrain" or n.startswith("fxtrain.")}
    own = {".".join(package[1:i]) for i in range(2, len(package) + 1)}
    packages = {".".join(parts[:i]) for n in names for parts in [n.split(".")]
                for i in range(1, len(parts))}
    return names | (packages - own)


def upward_imports(root: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        here = module_name(path)
        names = imported(path)
        for name in sorted(names):
            covered = any(other.startswith(name + ".") and floor_of(other) > floor_of(here)
                          for other in names)  # its package is named once, with the module
            if floor_of(name) > floor_of(here) and not covered:
                out.append(f"fxtrain.{here} (floor {floor_of(here)}) imports fxtrain.{name} "
                           f"(floor {floor_of(name)})")
    return out


def import_cycles(root: Path = PACKAGE) -> list[list[str]]:
    """The import cycles among the package's modules (lazy imports included; the package root,
    which re-exports everything, left out): each strongly connected group of two or more."""
    graph = {module_name(p): sorted(imported(p) - {"__init__"}) for p in root.rglob("*.py")}
    graph.pop("__init__", None)
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, cycles


def test_a_planted_cycle_is_caught(tmp_path):
    fake = tmp_path / "fxtrain"
    (fake / "callbacks").mkdir(parents=True)
    (fake / "tree.py").write_text("from .sharding import gathered\n")
    (fake / "sharding.py").write_text("def f():\n    from .tree import squared_norms\n")
    (fake / "callbacks" / "__init__.py").write_text("from .ema import ema\n")
    (fake / "callbacks" / "ema.py").write_text("from ..state import TrainState\n")
    (fake / "state.py").write_text("from .callbacks.core import init_states\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, fake
    try:
        found = import_cycles(fake)
    finally:
        PACKAGE = saved
    assert sorted(found) == [["callbacks", "callbacks.ema", "state"], ["sharding", "tree"]]


def test_no_module_imports_a_module_on_a_higher_floor():
    upward = upward_imports()
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("line", ["from ..callbacks.publish import loggable",
                                  "from .. import loop", "import fxtrain.step._steps",
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
    assert "callbacks" in imported(PACKAGE / "apps" / "demo" / "job.py")  # a submodule's package
    assert floor_of("protocol") < floor_of("state") < floor_of(
        "callbacks.log_metrics") < floor_of("step") < floor_of("loop")


def documented_floors(text: str) -> list[tuple[str, ...]]:
    """The floors docs/layout.md lists: its lines ``N. <what>: `a`, `b`, ...`` in order."""
    import re
    return [tuple(re.findall(r"`([\w.]+)`", line.split(":", 1)[1]))
            for line in text.splitlines() if re.match(r"\d+\. ", line)]  # 1. is floor 0


def test_the_layout_page_lists_these_floors():
    layout = PACKAGE.parent / "docs" / "layout.md"
    assert documented_floors(layout.read_text(encoding="utf-8")) == list(FLOORS), (
        "docs/layout.md's numbered floors differ from tests/unit/test_layers.py's FLOORS")
    planted = layout.read_text(encoding="utf-8").replace("`checkpoint`", "`checkpoint`, `loop`")
    assert documented_floors(planted) != list(FLOORS)


def test_no_module_imports_a_name_of_the_packages_front():
    """``from . import fit`` (a name ``fxtrain/__init__.py`` serves lazily, not a module) inside
    the package would load the whole public package in the middle of an import; modules import
    such names from the modules that define them."""
    import fxtrain

    front = set(fxtrain._NAMES)
    assert {"fit", "remat", "step_spec", "lr_find", "predict"} <= front
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level and node.module is None:
                found += [f"{path.name}: {a.name}" for a in node.names if a.name in front]
    assert not found, found


# torch's internals: a module or name of torch whose dotted path has a segment with a leading
# underscore (not a dunder: ``torch.__version__``). torch.utils._pytree is exempt: private by
# name, it is torch's only pytree module on every torch fxtrain supports (no public
# ``torch.utils.pytree`` up to 2.15), Dynamo traces it, and the whole package, as most of the
# ecosystem, uses it as a public API.
PUBLIC_INTERNALS = ("torch.utils._pytree",)

def _private(dotted: str) -> bool:
    if any(dotted == m or dotted.startswith(m + ".") for m in PUBLIC_INTERNALS):
        return False
    return any(part.startswith("_") and not (part.startswith("__") and part.endswith("__"))
               for part in dotted.split("."))


def _up_to_private(dotted: str) -> str:
    """``dotted`` up to its first private segment (``torch._dynamo.utils``: ``torch._dynamo``)."""
    parts = dotted.split(".")
    end = next(i for i in range(1, len(parts) + 1) if _private(".".join(parts[:i])))
    return ".".join(parts[:end])


def _chain(node: ast.Attribute) -> tuple[str, list[str]] | None:
    """``a.b.c`` as (``a``, [``b``, ``c``]); None when it does not start at a name."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    return (node.id, attrs[::-1]) if isinstance(node, ast.Name) else None


def torch_internals(path: Path) -> list[tuple[int, str]]:
    """Where the code at ``path`` reaches torch's internals, as (line, what): an import of a
    private module or name of torch, or an attribute chain with a private segment from
    ``torch`` or from a name imported from torch (strings and docstrings are not code)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    roots, found = {"torch": "torch"}, set()  # a name in the file -> what of torch it is
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "torch":
                    roots[a.asname or "torch"] = a.name if a.asname else "torch"
                    if _private(a.name):
                        found.add((node.lineno, _up_to_private(a.name)))
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module and \
                node.module.split(".")[0] == "torch":
            for a in node.names:
                roots[a.asname or a.name] = dotted = f"{node.module}.{a.name}"
                if _private(dotted):
                    found.add((node.lineno, _up_to_private(dotted)))
    for node in ast.walk(tree):
        chain = _chain(node) if isinstance(node, ast.Attribute) else None
        if chain is not None and chain[0] in roots:
            origin = roots[chain[0]]
            dotted = ".".join([origin, *chain[1]])
            if _private(dotted) and not _private(origin):  # a private origin: its import counts
                found.add((node.lineno, _up_to_private(dotted)))
    return sorted(found)


def internal_contacts(root: Path = PACKAGE) -> list[tuple[str, int, str]]:
    """Every (path relative to ``root``, line, what) at which a module outside ``_torch/``
    reaches torch's internals."""
    return [(path.relative_to(root).as_posix(), line, what)
            for path in sorted(root.rglob("*.py")) if path.relative_to(root).parts[0] != "_torch"
            for line, what in torch_internals(path)]


def test_no_module_outside_torch_reaches_torch_internals():
    """Every contact with torch's private or experimental internals lives in fxtrain/_torch/,
    where each module names the torch releases it was checked on and its fallback."""
    found = internal_contacts()
    offenders = [f"fxtrain/{path}:{line}: {what}" for path, line, what in found]
    assert not offenders, (
        "these modules reach torch's internals outside fxtrain/_torch/; move each contact into a "
        "module there (fxtrain/_torch/__init__.py says what one holds) and import it from "
        "there:\n" + "\n".join(offenders))


PLANTED = {  # a module's code -> the internal it reaches (None: none)
    "import torch._dynamo": "torch._dynamo",
    "x = torch._inductor.config": "torch._inductor",
    "from torch.nn.utils.stateless import _reparametrize_module":
        "torch.nn.utils.stateless._reparametrize_module",
    "def f():\n    import torch.distributed._functional_collectives as funcol":
        "torch.distributed._functional_collectives",
    "from torch.distributed import _functional_collectives":
        "torch.distributed._functional_collectives",
    "c10d = torch.ops._c10d_functional.wait_tensor": "torch.ops._c10d_functional",
    "ok = isinstance(op, torch._ops.OpOverload)": "torch._ops",
    "from torch._inductor import config": "torch._inductor",
    "import torch.nn.functional as F\nF._canonical_mask(m)": "torch.nn.functional._canonical_mask",
    "import torch.utils._pytree as pytree\npytree.tree_map(f, x)": None,
    "from torch.utils._pytree import tree_map": None,
    "v = torch.__version__, torch.Tensor.__bool__, torch.ops.aten.mm.default": None,
    "def f():\n    \"\"\"Calls torch._dynamo.explain.\"\"\"\n    return 'torch._dynamo'": None,
}


def test_a_planted_internal_outside_torch_is_caught(tmp_path):
    fake = tmp_path / "fxtrain"
    for folder in ("callbacks", "_torch"):
        (fake / folder).mkdir(parents=True)
        for i, code in enumerate(PLANTED):
            (fake / folder / f"m{i}.py").write_text(code + "\n")
    found = internal_contacts(fake)
    assert {path.split("/")[0] for path, _, _ in found} == {"callbacks"}, found  # not _torch/'s
    for i, (code, what) in enumerate(PLANTED.items()):
        here = [w for path, _, w in found if path == f"callbacks/m{i}.py"]
        assert here == ([what] if what else []), (code, here)


def test_the_torch_folder_imports_nothing_else_of_fxtrain():
    """fxtrain/_torch/ is under everything: its modules import only each other, relatively."""
    found = []
    for path in sorted((PACKAGE / "_torch").rglob("*.py")):
        found += [f"{path.name} imports fxtrain.{name}" for name in sorted(imported(path))
                  if name.split(".")[0] != "_torch"]
        found += [f"{path.name}: `from {node.module} import` (import it relatively)"
                  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                  if isinstance(node, ast.ImportFrom) and not node.level and node.module
                  and node.module.split(".")[0] == "fxtrain"]
    assert not found, found


# packages whose private modules only their own modules import: the rest of fxtrain goes through
# the names the package's __init__ exports (its face)
SEALED = ("distributed",)


def sealed_imports(root: Path = PACKAGE) -> list[str]:
    """Every import, from outside a ``SEALED`` package, of one of its private modules."""
    out = []
    for path in sorted(root.rglob("*.py")):
        here = module_name(path)
        for name in sorted(imported(path)):
            parts = name.split(".")
            for i, part in enumerate(parts[1:], 1):
                package = ".".join(parts[:i])
                if package in SEALED and part.startswith("_") and not part.startswith("__") \
                        and not (here == package or here.startswith(package + ".")):
                    out.append(f"fxtrain.{here} imports fxtrain.{name}, private to "
                               f"fxtrain.{package}")
    return out


def test_no_module_outside_a_sealed_package_imports_its_private_modules():
    found = sealed_imports()
    assert not found, "\n".join(found) + "\nimport what the package's __init__ exports"


@pytest.mark.parametrize("line", ["from ..distributed._layout import Layout",
                                  "from ..distributed import _units",
                                  "import fxtrain.distributed._shard"])
def test_a_planted_import_of_a_private_distributed_module_is_caught(tmp_path, line):
    fake = tmp_path / "fxtrain"
    (fake / "distributed").mkdir(parents=True)
    (fake / "step").mkdir()
    for name in ("_layout", "_units", "_shard", "__init__"):
        (fake / "distributed" / f"{name}.py").write_text("from ._layout import Layout\n")
    (fake / "step" / "_phases.py").write_text(line + "\n")
    (fake / "step" / "_ok.py").write_text("from ..distributed import Layout\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, fake
    try:
        found = sealed_imports(fake)
    finally:
        PACKAGE = saved
    assert len(found) == 1 and found[0].startswith("fxtrain.step._phases imports"), found


def _torch_private_names() -> frozenset[str]:
    """The private attributes (one leading underscore) of the torch objects fxtrain handles: a
    module and its class, a tensor, a parameter, a DTensor, a device mesh, an optimizer."""
    from torch import nn
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor
    objects = (nn.Module, nn.Linear(1, 1), torch.Tensor, torch.zeros(1), nn.Parameter, DTensor,
               DeviceMesh, torch.optim.SGD([torch.zeros(1, requires_grad=True)]))
    names = set()
    for obj in objects:
        names.update(dir(obj))
        names.update(getattr(obj, "__dict__", {}))
    return frozenset(n for n in names if n.startswith("_") and not n.startswith("__"))


def private_torch_attributes(root: Path = PACKAGE) -> list[tuple[str, int, str]]:
    """Every (path, line, name) at which a module outside ``_torch/`` reads a private attribute
    of a torch object (``x._forward_pre_hooks``, ``getattr(x, "_spec")``); attributes of the
    module's own objects (``self._x``, ``cls._x``) are its own."""
    private, out = _torch_private_names(), []
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).parts[0] == "_torch":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = None
            if isinstance(node, ast.Attribute) and node.attr in private and not (
                    isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                name = node.attr
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("getattr", "setattr", "hasattr", "delattr") and \
                    len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and \
                    node.args[1].value in private:
                name = node.args[1].value
            if name is not None:
                out.append((path.relative_to(root).as_posix(), node.lineno, name))
    return out


def test_no_module_outside_torch_reads_a_private_attribute_of_a_torch_object():
    found = private_torch_attributes()
    assert not found, ("these read torch objects' private attributes outside fxtrain/_torch/; "
                       "use the public API (a hook's handle, DTensor.to_local(), placements) or "
                       "fence the contact in fxtrain/_torch/:\n" + "\n".join(map(str, found)))


@pytest.mark.parametrize("code, name", [
    ("for k in list(sub._forward_pre_hooks):\n    pass", "_forward_pre_hooks"),
    ("local = p._local_tensor", "_local_tensor"),
    ("spec = getattr(x, '_spec')", "_spec"),
    ("self._spec = None\nok = t.to_local()", None)])
def test_a_planted_private_torch_attribute_is_caught(tmp_path, code, name):
    fake = tmp_path / "fxtrain"
    for folder in ("export", "_torch"):
        (fake / folder).mkdir(parents=True)
        (fake / folder / "m.py").write_text(code + "\n")
    found = private_torch_attributes(fake)
    assert [n for _, _, n in found] == ([name] if name else []), found
