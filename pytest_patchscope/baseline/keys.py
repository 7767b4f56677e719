"""Baseline keys: ``<test file>::<test name>::probe=<hash>``, the same however the run is started.

The test file is written relative to the *project root*, never to pytest's rootdir: the rootdir
moves with the command line (pytest derives it from any argument that looks like a path, such as
the value of ``--patchscope-baseline PATH`` written as two words), while the project root is a
property of where the test file lives. It is the nearest folder above the test that holds ``.git``
or ``.hg``; else one with ``pyproject.toml``, ``setup.py`` or ``setup.cfg``; else one with
``pytest.ini``, ``.pytest.ini`` or ``tox.ini``. So a key does not change with ``--opt PATH`` or
``--opt=PATH``, the working directory, where the baseline lives, a moved checkout, or an ini file
added later to a project that has a repository or a pyproject.toml.

Without any marker above a test, its path is written relative to the *baseline file's folder*
(:func:`unmarked_anchor`), which the command line cannot move either: the option's value is made
absolute against the working directory before it is used, whether the file exists yet or not. A
test below that folder gets a plain relative path (``test_x.py``, ``sub/test_x.py``); a test
outside it gets one that climbs (``../tests/test_x.py``), which stays the same as long as the tests
and the baseline keep their places relative to each other (a moved or copied folder holding both
keeps its keys). A baseline outside the tree of its tests therefore gives keys that name the way
from one to the other: keep the baseline next to the tests, or add a marker. A run without a
baseline file (a ``--patchscope-compare-model`` run, or ``record()`` with no baseline option)
falls back to pytest's rootdir: its keys only label probes in reports.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from pytest_patchscope.errors import ProbeConfigError

ROOT_MARKERS = (
    (".git", ".hg"),
    ("pyproject.toml", "setup.py", "setup.cfg"),
    ("pytest.ini", ".pytest.ini", "tox.ini"),
)
"""What marks a project root, strongest first: the first kind found anywhere above a test wins."""


@functools.lru_cache(maxsize=256)
def project_root(directory: Path) -> Path | None:
    """The project root above ``directory`` (see the module docstring), or None when nothing marks one."""
    ancestors = [directory, *directory.parents]
    for markers in ROOT_MARKERS:
        for folder in ancestors:
            if any((folder / marker).exists() for marker in markers):
                return folder
    return None


def unmarked_anchor(baseline_path: str | os.PathLike[str] | None, rootdir: Path) -> Path:
    """Where test paths start when no marker lies above a test: the baseline file's folder (absolute),
    else ``rootdir`` (see the module docstring)."""
    if baseline_path is None:
        return Path(os.path.abspath(rootdir))
    return Path(os.path.abspath(baseline_path)).parent


def anchored_path(path: str | os.PathLike[str], fallback_root: Path) -> str:
    """``path`` (a test file) relative to its project root, else to ``fallback_root`` (see
    :func:`unmarked_anchor`), as a POSIX path."""
    absolute = Path(os.path.abspath(path))
    root = project_root(absolute.parent) or Path(os.path.abspath(fallback_root))
    return PurePosixPath(Path(os.path.relpath(absolute, root))).as_posix()


def anchored_test_id(path: str | os.PathLike[str], nodeid: str, fallback_root: Path) -> str:
    """``<test file relative to the project root>::<the node id after the file>`` (class, name, params)."""
    tail = nodeid.split("::", 1)[1] if "::" in nodeid else nodeid
    return f"{anchored_path(path, fallback_root)}::{tail}"


def probe_hash(probe: Mapping[str, Any]) -> str:
    """12 hex digits identifying a probe's identity dict, independent of key order."""
    try:
        text = json.dumps(probe, sort_keys=True)
    except TypeError as exc:
        raise ProbeConfigError(
            "probe", probe, f"its identity must be JSON-serializable ({exc})",
            "Convert tensors, paths and callables to plain strings or numbers.",
        ) from exc
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def profile_key(test: str, probe: Mapping[str, Any], extra: str | None = None) -> str:
    """The baseline key of one sweep: ``<test id>::probe=<hash>[::<extra>]`` (see :func:`anchored_test_id`)."""
    posix = test.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        raise ProbeConfigError(
            "test", test, "a test id relative to the project root",
            "Absolute paths differ between machines, so baseline keys would never match.",
        )
    parts = [posix, f"probe={probe_hash(probe)}"]
    if extra is not None:
        parts.append(extra)
    return "::".join(parts)
