"""The documentation's examples as tests: README.md and docs/*.md, collected with Sybil.

A ```python block runs as written. A block that starts with `>>>` is a doctest: the output it
shows is compared with what the code prints (numbers to the precision shown, Sybil's NUMBER flag;
`...` matches anything, ELLIPSIS). The blocks of one page run in order and share one namespace,
which holds the session's `patchscope` fixture: the default model, loaded once for all pages. Each
example runs with the repository root as its working directory. Shell commands are ```bash blocks
and other text is a ```text block: neither is run. A Python block that cannot run here (a GPU,
another checkpoint) follows a `<!-- skip: next "why" -->` comment and is reported as skipped,
with that reason.

Only these pages are collected, so `pytest example_suites` (or any other folder) is unaffected.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

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
        fixtures=["patchscope", "_doc_in_repository_root"],
        name="docs",
    )
    return sybil.pytest()


@pytest.fixture
def _doc_in_repository_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pages' paths (example_suites/..., docs/...) are written from the repository root, as
    their commands are: run each example there, wherever pytest was started."""
    monkeypatch.chdir(ROOT)


def pytest_collect_file(file_path: Path, parent: Any) -> Any:
    global _collect
    if not _is_doc_page(file_path):
        return None
    if _collect is None:
        _collect = _sybil_collector()
    page = _collect(file_path, parent)
    if page is not None:  # the cost class of tests/conftest.py: the examples load the default model
        page.add_marker(pytest.mark.real)
    return page
