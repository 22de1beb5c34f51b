"""A ``DeviceMesh``'s hold on its process groups, let go at exit.

Checked on torch 2.11.0, 2.13.0, 2.14.1 and 2.15.0. ``DeviceMesh._pg_registry`` is private; no
public call makes a mesh drop its groups (``destroy_process_group`` leaves the mesh's
references). A mesh without the attribute (an older or newer torch) is left as it is: its
groups are then destroyed when the mesh is, possibly at the interpreter's finalization.
"""

from __future__ import annotations

from typing import Any


def forget_groups(mesh: Any) -> None:
    """Drops ``mesh``'s own references to its process groups, so that a group that nothing else
    holds (after ``destroy_process_group``) is destroyed now rather than with the mesh."""
    getattr(mesh, "_pg_registry", {}).clear()
