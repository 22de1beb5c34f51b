"""The demo's data, all of it on this machine already: scikit-learn's handwritten digits and
text from Python's own standard library. Nothing is downloaded."""

from __future__ import annotations

import ast
import codecs
import importlib.util
from pathlib import Path

import torch

__all__ = ["digits", "stdlib_text", "CharCodec", "char_windows", "char_sequences"]

# pure-Python standard library modules whose docstrings make the character model's corpus
TEXT_MODULES = ("this", "argparse", "textwrap", "functools", "dataclasses", "json.decoder",
                "collections", "statistics", "fractions", "difflib", "heapq", "pathlib",
                "contextlib", "string", "random", "calendar")


def digits(seed: int, test_fraction: float = 0.2):
    """scikit-learn's 1797 8x8 handwritten digits, split into train and held-out sets.

    Returns ``((x_train, y_train), (x_test, y_test))``: images ``[N, 1, 8, 8]`` float32 in
    [0, 1] and int64 labels. The split is stratified (the same fraction of every digit is held
    out) and depends only on ``seed``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("fxtrain demo trains on scikit-learn's bundled digits: "
                          "pip install 'fxtrain[demo]'") from e
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for label in range(10):
        idx = (y == label).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[:round(len(idx) * test_fraction)]] = True
    return (x[~test], y[~test]), (x[test], y[test])


def _docstrings(path: Path) -> list[str]:
    """The module's, classes' and functions' docstrings of one source file, in file order."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(
        n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
    docs = [ast.get_docstring(n) for n in nodes]
    return [d for d in docs if d and len(d) > 40]


def _zen(path: Path) -> str:
    """The Zen of Python: ``this.py`` keeps it ROT13-encoded in ``s`` (read, not imported)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "s":
            return codecs.decode(ast.literal_eval(node.value), "rot13")
    raise ValueError(f"{path}: no Zen of Python found")


def stdlib_text(max_chars: int = 200_000) -> str:
    """English prose that ships with Python: the Zen of Python and the docstrings of a fixed
    list of pure-Python standard library modules, read from their source (nothing imported)."""
    parts = []
    for name in TEXT_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue  # an unusual build without this module's source
        path = Path(spec.origin)
        parts.extend([_zen(path)] if name == "this" else _docstrings(path))
    text = "\n\n".join(parts)
    if len(text) < 10_000:
        raise RuntimeError("could not read the standard library's sources for the text corpus; "
                           "this Python ships without .py files")
    return text[:max_chars]


class CharCodec:
    """Characters to ids and back; characters outside the vocabulary become ``unknown``."""

    def __init__(self, text: str, unknown: str = "?"):
        self.chars = sorted(set(text) | {unknown})
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.unknown = self.index[unknown]

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index.get(c, self.unknown) for c in text], dtype=torch.int64)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def char_windows(ids: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``context`` characters and the one after them: ``([N, context], [N])``."""
    windows = ids.unfold(0, context + 1, 1)
    return windows[:, :-1].contiguous(), windows[:, -1].contiguous()


def char_sequences(ids: torch.Tensor, length: int,
                   stride: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of ``length`` characters every ``stride`` (default ``length``) and the same
    windows one character on, the next-character targets at every position:
    ``([N, length], [N, length])``."""
    windows = ids.unfold(0, length + 1, stride or length)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
