"""What a reader of the built book sees on each page: characters of visible code and of prose.

Visible code is the source of every code cell whose input is not folded away (`hide-input`,
`remove-input`); prose is the text of the page outside code cells and their outputs, the maths
boxes included (`dropdown`: prose one click away); `open_prose` leaves those boxes out. Both are
counted in characters of text, runs of white space as one.
Usage (after `make book`): python .ci/page_stats.py [_build/html]
"""

from __future__ import annotations

import sys
from pathlib import Path

from bs4 import BeautifulSoup

FOLDED = ("details", ".dropdown", ".toggle-details")


def page_stats(html: str) -> dict[str, int]:
    """Characters of ``code``, ``prose``, ``open_prose`` and ``hidden_code`` on one built page."""
    soup = BeautifulSoup(html, "html.parser")
    article = soup.select_one("article") or soup
    for junk in article.select("script, style, .headerlink, .copybtn"):
        junk.decompose()
    code = hidden = 0
    for cell in article.select("div.cell"):
        source = cell.select_one("div.cell_input")
        if source is not None:
            chars = len(source.get_text().strip())
            if source.find_parent("details") or "tag_hide-input" in cell.get("class", []):
                hidden += chars
            else:
                code += chars
        cell.decompose()
    prose = _chars(article)
    for folded in article.select(", ".join(FOLDED)):
        folded.decompose()
    return {"code": code, "prose": prose, "open_prose": _chars(article), "hidden_code": hidden}


def _chars(node) -> int:
    return len(" ".join(node.get_text(" ").split()))


def main(root: str = "_build/html") -> None:
    pages = sorted(Path(root, "book").glob("*.html"))
    print(
        f"{'page':20} {'code':>7} {'prose':>7} {'ratio':>6} {'open prose':>10} {'folded code':>11}"
    )
    for page in pages:
        s = page_stats(page.read_text())
        ratio = s["code"] / max(s["prose"], 1)
        print(
            f"{page.stem:20} {s['code']:7,} {s['prose']:7,} {ratio:6.2f} {s['open_prose']:10,} "
            f"{s['hidden_code']:11,}"
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
