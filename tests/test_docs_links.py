"""The README and the pages in docs/ link to each other: every relative link must land.

A reader who follows a link from the README to docs/tracking.md#mongodb must find the
file and the section. Links are Markdown ``[text](target)`` and ``![alt](target)`` outside
fenced code blocks; web addresses are not checked (the tests run offline).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def _prose_lines(page: Path) -> list[str]:
    """The page's lines outside fenced code blocks (links in code are not links)."""
    lines, fenced = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_anchor(m.group(1)) for line in _prose_lines(page) if (m := HEADING.match(line))}


def _relative_links(page: Path) -> list[str]:
    targets = [t for line in _prose_lines(page) for t in LINK.findall(line)]
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_the_readme_links_every_docs_page():
    linked = {(REPO / t.split("#")[0]).resolve() for t in _relative_links(REPO / "README.md")}
    assert PAGES[1:], "docs/ holds the documentation pages"
    assert set(PAGES[1:]) <= linked, sorted(p.name for p in set(PAGES[1:]) - linked)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_reaches_an_existing_file_and_section(page):
    broken = []
    for target in _relative_links(page):
        path, _, section = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target}: no file {destination}")
        elif section and section not in _anchors(destination):
            broken.append(f"{target}: no heading with anchor #{section} in {destination.name}")
    assert not broken, "\n".join(broken)
