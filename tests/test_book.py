"""Book-level checks: every chapter is executed, clean, imports ddpm_lib, and shows in the HTML."""

import base64
import fcntl
import importlib.util
import re
import struct
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from ddpm_lib.plotting import PAGE_DPI, PAGE_WIDTH, VERDICTS

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
MAX_BYTES = 3_000_000
STRAY = re.compile(r"Traceback|Warning|No CUDA runtime is found|Error:")
# A cell tagged "shows-errors" prints caught exceptions on purpose (chapter 5's broken loop).
STRAY_IN_ERROR_DEMO = re.compile(r"Traceback|Warning|No CUDA runtime is found")


def toc_chapters() -> list[Path]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [c["file"] for part in toc.get("parts", []) for c in part["chapters"]]
    # Markdown pages in the TOC (the glossary) are not chapters.
    return [ROOT / f"{f}.ipynb" for f in files if not (ROOT / f"{f}.md").is_file()]


CHAPTERS = toc_chapters()


def read(path: Path):
    return nbformat.read(path, as_version=4)


def outputs(nb):
    for cell in nb.cells:
        if cell.cell_type == "code":
            yield from cell.get("outputs", [])


def test_the_toc_lists_chapters_that_exist():
    assert CHAPTERS, "no chapter in _toc.yml"
    for path in CHAPTERS:
        assert path.is_file(), path


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_is_executed_and_clean(path):
    nb = read(path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "a code cell was never run"
    assert path.stat().st_size < MAX_BYTES
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    for cell in nb.cells:
        assert "execution" not in cell.metadata, (
            "metadata not normalised (.ci/normalize_notebooks.py)"
        )
    for cell in code:
        stray = STRAY_IN_ERROR_DEMO if "shows-errors" in cell.metadata.get("tags", []) else STRAY
        for out in cell.get("outputs", []):
            assert out.output_type != "error", out.get("ename")
            text = out.get("text", "") if out.output_type == "stream" else ""
            text += str(out.get("data", {}).get("text/plain", ""))
            assert not stray.search(text), text[:300]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_follows_the_book_conventions(path):
    nb = read(path)
    first_code = next(c for c in nb.cells if c.cell_type == "code").source
    assert "import ddpm_lib" in first_code and "except ImportError" in first_code
    assert "pip install" in first_code and "P.describe()" in first_code
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    sources = "\n".join(c.source for c in nb.cells)
    assert "P.pick(" in sources, "no settings picked by profile"
    assert ":class: dropdown" in sources, "formulas belong in collapsible boxes"
    assert "claims_table(" in sources, "no claims table"
    images = sum("image/png" in o.get("data", {}) for o in outputs(nb))
    assert images >= 2, "a chapter shows its results in figures"


def fresh_html() -> Path:
    """The built book; (re)built here when missing or older than a chapter. Under pytest-xdist
    the workers take turns (a lock file in _build): one builds, the others then find it fresh."""
    index = HTML / "book" / "index.html"
    newest = max(p.stat().st_mtime for p in [*CHAPTERS, ROOT / "book" / "index.md"])
    HTML.parent.mkdir(exist_ok=True)
    with open(HTML.parent / ".fresh_html.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not index.is_file() or index.stat().st_mtime < newest:
            jb = Path(sys.executable).with_name("jupyter-book")
            subprocess.run(
                [str(jb), "build", str(ROOT), "--warningiserror", "--keep-going"],
                check=True,
                capture_output=True,
                timeout=600,
            )
    return HTML


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_figure_and_animation_is_in_the_built_page(path):
    html_dir = fresh_html()
    page = (html_dir / path.relative_to(ROOT).with_suffix(".html")).read_text()
    nb = read(path)
    images = sum("image/png" in o.get("data", {}) for o in outputs(nb))
    animations = sum(
        str(o.get("data", {}).get("text/html", "")).count('class="animation"') for o in outputs(nb)
    )
    shown = re.findall(r'<img[^>]+src="[^"]*_images/[^"]+\.png"', page)
    assert len(shown) >= images, (len(shown), images)
    for src in re.findall(r'src="([^"]*_images/[^"]+\.png)"', page):
        assert (html_dir / path.relative_to(ROOT).parent / src).resolve().is_file(), src
    assert page.count('class="animation"') == animations


def load_page_stats():
    spec = importlib.util.spec_from_file_location("page_stats", ROOT / ".ci" / "page_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.page_stats


def test_every_page_reads_offline():
    """Math, scripts and styles come from the built site: no page asks a CDN for anything."""
    html_dir = fresh_html()
    pages = [p for p in html_dir.rglob("*.html") if "_static" not in p.parts]
    assert pages
    remote = re.compile(r'<(?:script|link|img)\b[^>]*\b(?:src|href)="(?:https?:)?//[^"]*"')
    for page in pages:
        text = page.read_text()
        assert not remote.search(text), (page.name, remote.search(text).group(0))
        if 'class="math' in text:
            scripts = re.findall(r'<script[^>]*src="([^"]*mathjax[^"]*)"', text)
            assert scripts, f"{page.name}: math but no MathJax script"
            for src in scripts:
                assert (page.parent / src.split("?")[0]).is_file(), (page.name, src)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_visible_code_is_at_most_half_of_the_prose(path):
    """Plumbing (setup, settings, drawing, scoring) is folded away; the ideas' code stays."""
    page = fresh_html() / path.relative_to(ROOT).with_suffix(".html")
    stats = load_page_stats()(page.read_text())
    assert stats["code"] <= 0.5 * stats["prose"], stats


def png_size_and_dpi(data: bytes) -> tuple[int, float]:
    """Width in pixels and horizontal dpi (from the pHYs chunk; 72 when absent) of a PNG."""
    width = struct.unpack(">I", data[16:20])[0]
    at = data.find(b"pHYs")
    if at < 0:
        return width, 72.0
    per_unit, _, unit = struct.unpack(">IIB", data[at + 4 : at + 13])
    return width, per_unit * 0.0254 if unit == 1 else 72.0


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_figures_are_sharp_and_fit_the_column(path):
    """>= 144 dpi; at most about PAGE_WIDTH inches wide, so text is not shrunk below 9 pt."""

    for out in outputs(read(path)):
        data = out.get("data", {}).get("image/png")
        if data:
            width, dpi = png_size_and_dpi(base64.b64decode(data))
            assert dpi >= PAGE_DPI - 1, f"a figure at {dpi:.0f} dpi"
            assert width <= (PAGE_WIDTH + 0.3) * PAGE_DPI, f"a figure {width} px wide"


HEADING = re.compile(r"^(#{1,6}) (.*)$", re.MULTILINE)
TYPED_SECTION = re.compile(r"\b[Ss]ections? \d+\.\d+")
CHAPTER_LINK = re.compile(r"\[[Cc]hapter (\d+)\]\((\d\d)_\w+\.(?:ipynb|md)(?:#[\w-]+)?\)")
TYPED_CHAPTER = re.compile(r"\b[Cc]hapters? \d")


def markdown_sources(path: Path) -> list[str]:
    if path.suffix == ".md":
        return [path.read_text()]
    return [c.source for c in read(path).cells if c.cell_type == "markdown"]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_sections_are_numbered_continuously(path):
    chapter = int(path.stem[:2])
    numbers = []
    for source in markdown_sources(path):
        for hashes, title in HEADING.findall(source):
            m = re.match(r"(\d+)\.(\d+) ", title)
            if len(hashes) == 2 and m:
                assert int(m.group(1)) == chapter, title
                numbers.append(int(m.group(2)))
    assert numbers == list(range(1, len(numbers) + 1)), numbers


@pytest.mark.parametrize("path", [*CHAPTERS, ROOT / "book" / "index.md"], ids=lambda p: p.stem)
def test_cross_references_are_links_not_typed_numbers(path):
    """ "section 6.4" is written {ref}`sec-label`; "chapter 7" is a link to chapter 7's file."""
    for source in markdown_sources(path):
        typed = TYPED_SECTION.search(source)
        assert not typed, f"typed section number: ...{source[typed.start() : typed.end() + 30]}"
        for number, file_number in CHAPTER_LINK.findall(source):
            assert number == str(int(file_number)), f"[chapter {number}] links to {file_number}_"
        rest = CHAPTER_LINK.sub("", source)
        unlinked = TYPED_CHAPTER.search(rest)
        where = rest[max(unlinked.start() - 30, 0) : unlinked.end() + 30] if unlinked else ""
        assert not unlinked, f"chapter number not linked: ...{where}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_claim_has_a_verdict(path):
    tables = [
        str(out["data"]["text/markdown"])
        for out in outputs(read(path))
        if "| Verdict |" in str(out.get("data", {}).get("text/markdown", ""))
    ]
    assert len(tables) == 1, "one claims table per chapter, made by claims_table()"
    rows = tables[0].splitlines()[2:]
    assert rows
    for row in rows:
        verdict = row.rstrip(" |").rsplit(" | ", 1)[1].lower()
        assert verdict.startswith(VERDICTS), row


LIST_MARKER = re.compile(r"^\s*(?:[-+*]|\d+[.)])\s")


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_no_display_formula_line_starts_like_a_list_item(path):
    """Inside $$ ... $$ spread over lines, a line that starts with "+ " (or "- ", "1. ") is read
    by MyST as a list item: the formula breaks in two (and so does its translation). Put the
    operator at the end of the line before."""
    for source in markdown_sources(path):
        inside = False
        for line in source.splitlines():
            assert not (inside and LIST_MARKER.match(line)), f"formula line {line[:50]!r}"
            inside ^= line.count("$$") % 2 == 1
