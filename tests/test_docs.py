"""The README and docs/: the parameters page is what `make docs` writes, and every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline import params_doc

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|<img[^>]*\ssrc=\"([^\"]+)\"")


def links(text: str) -> list[str]:
    """Link targets of markdown links and <img> tags, outside code (a path in a code block is not a link)."""
    text = _CODE.sub("", _FENCE.sub("", text))
    return [a or b for a, b in _LINK.findall(text)]


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", _FENCE.sub("", text), re.M)
    return {re.sub(r"[^\w\- ]", "", h.replace("`", "").lower()).replace(" ", "-") for h in headings}


def test_links_finds_markdown_and_html_targets_but_not_code():
    text = '[a](docs/a.md) ![b](fig.png "t") <img src="c.png" width="4">\n`[x](no.md)`\n```\n[y](no2.md)\n```\n'
    assert links(text) == ["docs/a.md", "fig.png", "c.png"]


def test_parameters_page_is_current():
    page = ROOT / params_doc.PAGE
    expected = params_doc.render(ROOT / "params.yaml")
    assert page.exists() and page.read_text() == expected, (
        f"{params_doc.PAGE} is not what the Field descriptions and params.yaml give: run `{params_doc.COMMAND}`"
    )


def test_anchors_follow_github():
    assert anchors("## shard: images → WebDataset shards\n## `cart plan`: cost\n```\n# not a heading\n```\n") == {
        "shard-images--webdataset-shards",
        "cart-plan-cost",
    }


def test_every_relative_link_resolves():
    """Every link to a file of the repository names one that exists, and its #anchor a heading of that page."""
    broken = []
    for page in PAGES:
        for target in links(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path, _, anchor = target.partition("#")
            file = page.parent / path if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_a_landing_page_linking_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250, "README.md is a landing page: keep it to 250 lines, move detail to docs/"
    linked = {Path(t.split("#")[0]).name for t in links(readme) if t.startswith("docs/")}
    missing = [p.name for p in PAGES[1:] if p.name not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"
