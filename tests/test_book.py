"""Book-level checks: every chapter is executed, clean, imports ddpm_lib, and shows in the HTML."""

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
MAX_BYTES = 3_000_000
STRAY = re.compile(r"Traceback|Warning|No CUDA runtime is found|Error:")
# A cell tagged "shows-errors" prints caught exceptions on purpose (chapter 5's broken loop).
STRAY_IN_ERROR_DEMO = re.compile(r"Traceback|Warning|No CUDA runtime is found")


def toc_chapters() -> list[Path]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [c["file"] for part in toc.get("parts", []) for c in part["chapters"]]
    return [ROOT / f"{f}.ipynb" for f in files]


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
    assert "The article says" in sources, "no claims table"
    images = sum("image/png" in o.get("data", {}) for o in outputs(nb))
    assert images >= 2, "a chapter shows its results in figures"


def fresh_html() -> Path:
    """The built book; (re)built here when missing or older than a chapter."""
    index = HTML / "book" / "index.html"
    newest = max(p.stat().st_mtime for p in [*CHAPTERS, ROOT / "book" / "index.md"])
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
