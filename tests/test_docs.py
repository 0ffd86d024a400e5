"""The documentation's links hold: every relative link and section pointer (``#anchor``) of README.md and
docs/*.md names an existing file and, for a Markdown file, one of its headings (by GitHub's anchor rules); every
docs page is in the README's table; the README stays short enough to read in five minutes."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_README_LINES = 200
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def prose_lines(text: str) -> List[str]:
    """The lines of a Markdown text outside code: fenced blocks and indented blocks (4 spaces after a blank line)
    are blanked, so that neither a ``# comment`` nor a ``[x](y)`` inside code counts."""
    lines, out, fenced, indented, previous_blank = text.splitlines(), [], False, False, True
    for line in lines:
        if FENCE.match(line):
            fenced = not fenced
            out.append("")
        elif fenced:
            out.append("")
        else:
            indented = bool(line.strip()) and line.startswith("    ") and (indented or previous_blank)
            out.append("" if indented else line)
        previous_blank = not line.strip()
    return out


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: the heading's text (code spans, links and images by their text), lower-cased,
    every character dropped that is not a letter, digit, space, hyphen or underscore, each space a hyphen."""
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors_of(path: Path) -> set:
    """Every heading's anchor in ``path``; a repeated one gets -1, -2, ... as on GitHub."""
    seen: Dict[str, int] = {}
    anchors = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        anchor = github_anchor(match.group(2))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        anchors.add(anchor if count == 0 else f"{anchor}-{count}")
    return anchors


def links_of(path: Path) -> List[Tuple[int, str]]:
    """(line number, target) of every link and image outside code in ``path``."""
    found = []
    for number, line in enumerate(prose_lines(path.read_text(encoding="utf-8")), start=1):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            found.append((number, match.group(1)))
    return found


def broken_links(path: Path, root: Path = REPO) -> List[str]:
    """The relative links of ``path`` whose file or heading does not exist, as 'file:line: target (why)', the file
    named relative to ``root``."""
    problems = []
    for number, target in links_of(path):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{number}: {target}"
        if not linked.exists():
            problems.append(f"{where} (no file {linked})")
        elif anchor and linked.suffix == ".md" and anchor not in anchors_of(linked):
            problems.append(f"{where} (no heading with the anchor #{anchor} in {linked.name})")
    return problems


@pytest.mark.parametrize("heading, anchor", [
    ("How long will a run take?", "how-long-will-a-run-take"),
    ("`tta` and MONAI Label's TTA", "tta-and-monai-labels-tta"),
    ("A run: `--oracle label_studio`", "a-run---oracle-label_studio"),
    ("Embedding strategies: one selection", "embedding-strategies-one-selection"),
    ("On a cluster (SLURM)", "on-a-cluster-slurm"),
    ("Docs [page](x.md) — see *this*", "docs-page--see-this"),
])
def test_anchors_follow_githubs_rules(heading, anchor):
    assert github_anchor(heading) == anchor


def test_repeated_headings_are_numbered_and_code_is_not_a_heading(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Tests\n\n```bash\n# not a heading\n```\n\n    # nor this\n\n## Tests\n")
    assert anchors_of(page) == {"title", "tests", "tests-1"}


def test_a_broken_link_or_anchor_is_found_and_code_is_left_alone(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text("See [other](other.md#a-section), [here](#top) and [gone](missing.md), [bad](other.md#nope).\n"
                    "\n# Top\n\n`[code](missing.md)`\n\n    [indented](missing.md)\n\n![image](other.md)\n"
                    "[web](https://example.org/x#y)\n")
    problems = [p.split(": ", 1)[1] for p in broken_links(page, tmp_path)]
    assert [p.split(" (")[0] for p in problems] == ["missing.md", "other.md#nope"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_section_pointer_resolves(page):
    assert links_of(page) or page.name != "README.md", "no link found at all: the link scan is broken"
    assert broken_links(page) == []


def test_every_docs_page_is_in_the_readme():
    linked = {(REPO / target.partition("#")[0]).resolve() for _, target in links_of(REPO / "README.md")}
    assert DOCS and [p.name for p in DOCS if p.resolve() not in linked] == []


def test_the_readme_stays_short():
    lines = len((REPO / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move details into docs/"
