"""A run's saved config, ``<workdir>/config.yaml``: what ``fxtrain train --resume`` checks.

The record is the merged config without the keys that say how to run, not what (``resume``,
``allow_changes``, ``progress``). A resume compares it with the saved one, key by key
(``optim.lr``, ``model_args.width``; ``workdir`` aside: the folder may have moved), and refuses
each difference the run was not told to allow. The file is always the config of the newest
run in the workdir: (re)written atomically when a run starts training, and when it is replaced
the old one is kept as ``config.<step>.yaml`` (the step of the newest checkpoint it produced),
so nothing is lost.

Examples:
    >>> from fxtrain.apps._saved_config import changes, not_allowed, describe
    >>> found = changes({"max_steps": 10, "optim": {"lr": 0.01, "name": "adamw"}},
    ...                 {"max_steps": 20, "optim": {"lr": 0.003, "name": "adamw"}})
    >>> describe(found)
    'max_steps 10 -> 20, optim.lr 0.01 -> 0.003'
    >>> not_allowed(found, "optim")  # optim.* may change
    [('max_steps', 10, 20)]
    >>> not_allowed(found, True), not_allowed(found, ["max_steps", "optim.lr"])
    ([], [])
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from .._files import write_whole

NAME = "config.yaml"
HOW_TO_RUN = ("resume", "allow_changes", "progress")  # never saved, never compared
NOT_COMPARED = ("workdir",)


def record(values: dict[str, Any]) -> dict[str, Any]:
    """The config to save and compare: ``values`` (``run``'s arguments) without the how-to-run
    keys, as YAML reads it back (dataclasses as dicts, tuples as lists)."""
    kept = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
            for k, v in values.items() if k not in HOW_TO_RUN}
    return yaml.safe_load(yaml.safe_dump(kept, sort_keys=False))


def read(root: Path) -> dict[str, Any] | None:
    """The saved config of the run in ``root`` (None: there is none); a ValueError when the
    file is not a config."""
    try:
        saved = yaml.safe_load((root / NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{root / NAME} is not YAML ({' '.join(str(e).split())})") from e
    if not isinstance(saved, dict):
        raise ValueError(f"{root / NAME} holds no config (a {type(saved).__name__})")
    return {k: v for k, v in saved.items() if k not in HOW_TO_RUN}


def changes(saved: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Each key whose value differs, as (dotted key, old, new); nested dicts key by key, an
    absent key as None (how older fxtrain versions saved an unset one)."""
    found = []
    for key in [*saved, *(k for k in new if k not in saved)]:
        if not prefix and key in NOT_COMPARED:
            continue
        old, now = saved.get(key), new.get(key)
        if isinstance(old, dict) and isinstance(now, dict):
            found += changes(old, now, f"{prefix}{key}.")
        elif old != now:
            found.append((prefix + key, old, now))
    return found


def not_allowed(found: list[tuple[str, Any, Any]], allow: bool | str | list[str] | None) -> list:
    """The changes ``allow`` does not permit: ``True`` permits all; names (a list, or one
    comma-separated string) permit those keys and the keys under them (``optim``: ``optim.*``)."""
    if allow is True:
        return []
    names = allow.split(",") if isinstance(allow, str) else list(allow or [])
    names = [n.strip() for name in names for n in str(name).split(",") if n.strip()]
    return [c for c in found if not any(c[0] == n or c[0].startswith(n + ".") for n in names)]


def describe(found: list[tuple[str, Any, Any]]) -> str:
    """``key old -> new, ...`` on one line."""
    return ", ".join(f"{key} {_shown(old)} -> {_shown(new)}" for key, old, new in found)


def _shown(value: Any) -> str:
    return value if isinstance(value, str) and value else json.dumps(value)


def save(root: Path, new: dict[str, Any], step: int) -> Path | None:
    """Writes ``new`` as ``root/config.yaml`` (atomically) unless it is there already; an older
    config there is kept as ``config.<step>.yaml`` first (``step``: its newest checkpoint's).
    Returns where the older config went (None: there was none to keep)."""
    path = root / NAME
    text = yaml.safe_dump(new, sort_keys=False)
    old = path.read_text(encoding="utf-8") if path.exists() else None
    if old is not None and read(root) == new:
        return None
    kept = None
    if old is not None:
        kept = _free(root, step)
        write_whole(kept, old.encode())
    write_whole(path, text.encode())
    return kept


def _free(root: Path, step: int) -> Path:
    """``config.<step>.yaml``, or ``config.<step>-2.yaml``, ... if that is taken."""
    path, n = root / f"config.{step}.yaml", 1
    while path.exists():
        n += 1
        path = root / f"config.{step}-{n}.yaml"
    return path
