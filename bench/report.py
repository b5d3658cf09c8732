"""Markdown output shared by the benchmarks, and the page they write to, docs/benchmarks.md.

Each benchmark owns one section of the page, between `<!-- NAME:start -->` and
`<!-- NAME:end -->` comments, and rewrites only that section, so text written by
hand around the sections survives a rerun.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS_PAGE = ROOT / "docs" / "benchmarks.md"
RESULTS_DIR = Path(__file__).resolve().parent / ".cache" / "results"

PAGE_TITLE = "# Benchmarks\n"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Format rows as a GitHub-flavoured Markdown table; columns of numbers align right.

    Floats are shown with two decimals, so callers pass a formatted string for any
    other precision.
    """
    cells = [[_cell(value) for value in row] for row in rows]
    numeric = [
        all(_is_number(row[column]) for row in rows if row[column] not in (None, ""))
        for column in range(len(headers))
    ]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if is_number else "---" for is_number in numeric) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _is_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(str(value).rstrip("%"))
    except ValueError:
        return False
    return True


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("|", "\\|")


def write_docs_section(name: str, body: str, page: Path = DOCS_PAGE) -> None:
    """Replace the section `name` of the benchmarks page with `body`, or append it."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = page.read_text("utf-8") if page.is_file() else PAGE_TITLE
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text, "utf-8")


def megabytes(size: int | None) -> float | None:
    return None if size is None else size / 1e6
