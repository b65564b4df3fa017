"""Build the book with Jupyter Book's own configuration, for another language or another builder.

`jupyter-book build` passes no `-D` to Sphinx, so the Chinese edition and the message catalogs
cannot be asked of its command line. This script calls the same function the command calls
(`jupyter_book.sphinx.build_sphinx`, which reads `_config.yml` and `_toc.yml`) and adds a few
overrides on top: `_config.yml` stays the one source of truth, and nothing is generated to drift.
Each language and builder keeps its own doctree cache, so the builds stay incremental side by side.

Usage (from the repository root; `make book` / `make translations` call it):
    python .ci/build_book.py html zh_CN [OUTDIR]   # the Chinese site, default _build/html/zh
                                                   # (built in _build/zh/html, then copied)
    python .ci/build_book.py gettext [OUTDIR]      # message templates, default _build/gettext
Both run with warnings as errors, --nitpick and --keep-going, as `make book` does for English.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What only the translated editions change; everything else comes from _config.yml.
LANGUAGES = {
    "zh_CN": {
        "language": "zh_CN",
        "html_title": "大白话扩散模型",
        # Chinese search splits words with jieba (pinned in requirements.txt); without it Sphinx
        # would fall back to single characters.
        "html_search_language": "zh",
        # myst-nb's toggle of folded code cells (the chapters fold code with hide-input only).
        "nb_code_prompt_show": "显示代码",
        "nb_code_prompt_hide": "隐藏代码",
    },
}
DEFAULT_OUT = {"html": "_build/html/{lang}", "gettext": "_build/gettext"}


def build(builder: str, language: str | None, outdir: Path) -> int:
    from jupyter_book.sphinx import build_sphinx

    overrides: dict = {
        "external_toc_path": (ROOT / "_toc.yml").as_posix(),
        "latex_individualpages": False,
        "nitpicky": True,
    }
    if language:
        overrides.update(LANGUAGES[language])
    tag = language or builder
    # The default folders share _build/ with the English build; another folder (the tests' tmp
    # folder) gets its own cache beside it, so that parallel test workers never share one.
    defaults = {ROOT / "_build" / tag.split("_")[0] / "html", ROOT / DEFAULT_OUT["gettext"]}
    if outdir in defaults:
        doctrees = ROOT / "_build" / f".doctrees-{tag}"
    else:
        doctrees = outdir.with_name(outdir.name + ".doctrees")
    result = build_sphinx(
        ROOT,
        outdir,
        noconfig=True,
        path_config=ROOT / "_config.yml",
        confoverrides=overrides,
        doctreedir=doctrees,
        builder=builder,
        warningiserror=True,
        keep_going=True,
        # html: read only the changed sources, but write every page, so that a title translated
        # in one catalog also reaches the sidebar of every other page.
        force_all=builder == "html",
    )
    if isinstance(result, Exception):
        print(f"build_book: {builder} {tag} failed: {result}", file=sys.stderr)
        return 1
    return int(result or 0)


def publish(built: Path, site: Path) -> None:
    """Replace the edition's folder of the site with the fresh build."""
    shutil.rmtree(site, ignore_errors=True)
    shutil.copytree(built, site)
    print(f"build_book: copied to {site}")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in DEFAULT_OUT:
        print(__doc__, file=sys.stderr)
        return 2
    builder, rest = argv[0], argv[1:]
    language = None
    if builder == "html":
        if not rest or rest[0] not in LANGUAGES:
            print(f"html needs a language: one of {sorted(LANGUAGES)}", file=sys.stderr)
            return 2
        language, rest = rest[0], rest[1:]
    if rest and rest[0].startswith("-"):
        print(f"unknown option {rest[0]}: only an output folder may follow", file=sys.stderr)
        return 2
    short = language.split("_")[0] if language else ""
    if rest:
        return build(builder, language, Path(rest[0]).resolve())
    if builder == "gettext":
        return build(builder, None, ROOT / DEFAULT_OUT["gettext"])
    # myst-nb writes its images to <outdir>/../jupyter_execute: were the outdir _build/html/zh,
    # that folder would land inside the English site. So build in _build/zh/html, then copy.
    built = ROOT / "_build" / short / "html"
    status = build(builder, language, built)
    if status == 0:
        publish(built, ROOT / DEFAULT_OUT["html"].format(lang=short))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
