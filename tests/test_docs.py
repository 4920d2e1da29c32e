"""The README stays short and its links lead somewhere: the long sections live under docs/."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text, fence, out = page.read_text(encoding="utf-8"), False, set()
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and re.match(r"#{1,6} ", line):
            out.add(_slug(line.lstrip("#")))
    return out


def _broken_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
            broken.append(target)
    return broken


def test_readme_is_at_most_350_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 350, f"README.md has {len(lines)} lines: move the detail to a page under docs/"


def test_every_docs_page_is_linked_from_the_readme_and_every_link_resolves():
    readme = ROOT / "README.md"
    linked = {t.partition("#")[0] for t in LINK.findall(readme.read_text(encoding="utf-8"))}
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages
    assert {f"docs/{p.name}" for p in pages} <= linked, "a page under docs/ that the README does not link"
    for page in [readme, *pages]:
        assert not _broken_links(page), (page.name, _broken_links(page))


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n", encoding="utf-8")
    page.write_text(
        "[ok](other.md) [ok](other.md#a-section) [gone](docs/gone.md) [bad](other.md#nothing) [web](https://x)\n"
        "```\n[in a fence](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    assert _broken_links(page) == ["docs/gone.md", "other.md#nothing"]


def test_the_readme_test_command_is_the_one_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = 'python3 -m pip install -e ".[test]" && python3 -m pytest tests'
    assert command in readme
    assert command in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_every_docs_page_has_a_title_and_a_way_back():
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = page.read_text(encoding="utf-8")
        assert text.startswith("# ") and "](../README.md" in text, page.name
