"""Griffe extension for the API pages: a redundant alias re-exports a name.

``from .loop import fit as fit`` is how fxtrain's packages mark their public names (the typing
convention for explicit re-exports). Griffe only counts ``__all__``, so this extension marks such
aliases public; mkdocstrings then renders them on the package's page.
"""

from __future__ import annotations

import ast
from typing import Any

import griffe


class RedundantAliasesArePublic(griffe.Extension):
    """Mark ``import x as x`` and ``from m import x as x`` aliases as public."""

    def on_alias_instance(self, *, node: Any, alias: griffe.Alias, **kwargs: Any) -> None:
        if isinstance(node, ast.ImportFrom | ast.Import):
            if any(name.asname == name.name == alias.name for name in node.names):
                alias.public = True
