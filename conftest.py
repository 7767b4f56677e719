"""The documentation's examples as tests: README.md and docs/*.md, collected with Sybil.

A ```python block runs as written. A block that starts with `>>>` is a doctest: the output it
shows is compared with what the code prints (numbers to the precision shown, Sybil's NUMBER flag;
`...` matches anything, ELLIPSIS). The blocks of one page run in order and share one namespace,
which holds the session's `patchscope` fixture: the default model, loaded once for all pages.
Shell commands are ```bash blocks and output that no code prints is a ```text block: neither is
run. A Python block that cannot run here (a GPU, another checkpoint) follows a
`<!-- skip: next "why" -->` comment and is reported as skipped, with that reason.

Only these pages are collected, so `pytest example_suites` (or any other folder) is unaffected.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent
_collect: Callable[[Path, Any], Any] | None = None


def _is_doc_page(path: Path) -> bool:
    return path.suffix == ".md" and (path == ROOT / "README.md" or path.parent == ROOT / "docs")


def _sybil_collector() -> Callable[[Path, Any], Any]:
    import doctest

    try:
        from sybil import Sybil
        from sybil.evaluators.doctest import NUMBER
        from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser
    except ImportError as exc:  # the examples are tests: missing Sybil must not pass silently
        raise ImportError(
            "README.md and docs/*.md are collected as tests with Sybil, which is not installed: "
            "pip install -r requirements-dev.txt (or run `make test`)"
        ) from exc
    sybil = Sybil(
        parsers=[PythonCodeBlockParser(doctest_optionflags=doctest.ELLIPSIS | NUMBER), SkipParser()],
        patterns=["README.md", "docs/*.md"],
        fixtures=["patchscope"],
        name="docs",
    )
    return sybil.pytest()


def pytest_collect_file(file_path: Path, parent: Any) -> Any:
    global _collect
    if not _is_doc_page(file_path):
        return None
    if _collect is None:
        _collect = _sybil_collector()
    return _collect(file_path, parent)
