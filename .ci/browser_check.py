"""Open every page of the built book in headless Chromium with the network off, as a reader would.

Checks per page: every request stays inside the site (anything else is blocked and reported);
math is typeset by MathJax (its output elements present, no raw TeX left in the visible text);
every image has loaded; every animation shows its controls; no code cell needs a horizontal
scroll bar; the console has no errors. Also
reports the width of the text column, which `ddpm_lib.plotting.PAGE_WIDTH` is sized for.

Usage (after `make book`): `make browser-check`, or python .ci/browser_check.py [_build/html]
Needs Debian's chromium (/usr/bin/chromium) and the playwright package (no browser download).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RAW_TEX = re.compile(r"\\\(|\\\[|\$\$")

PAGE_REPORT = """() => {
    document.querySelectorAll("details").forEach(d => { d.open = true; });  // folded code too
    const visible = document.querySelector("article")?.innerText ?? document.body.innerText;
    const images = [...document.querySelectorAll("article img")];
    const animations = [...document.querySelectorAll("div.animation")];
    const column = document.querySelector("article")?.getBoundingClientRect().width ?? 0;
    return {
        text: visible,
        mathSource: document.querySelectorAll("span.math, div.math").length,
        mathTypeset: document.querySelectorAll("mjx-container").length,
        images: images.length,
        broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
        animations: animations.length,
        withControls: animations.filter(a =>
            a.querySelector(".anim-buttons button") && a.querySelector("input[type=range]")).length,
        column: Math.round(column),
        wideCode: [...document.querySelectorAll("div.cell_input pre")]
            .filter(p => p.scrollWidth > p.clientWidth + 1)
            .map(p => p.innerText.split("\\n").reduce((a, b) => (b.length > a.length ? b : a), "")),
    };
}"""


def check_page(browser, page_path: Path) -> list[str]:
    """Load one page; return the problems found (empty when it reads as it should)."""
    problems: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

    def only_local(route):
        if route.request.url.startswith(("file:", "data:", "blob:")):
            route.continue_()
        else:
            problems.append(f"network request blocked: {route.request.url}")
            route.abort()

    page.route("**/*", only_local)
    page.goto(page_path.resolve().as_uri(), wait_until="load")
    if page.locator("span.math, div.math").count():
        page.wait_for_function("window.MathJax?.startup?.promise", timeout=20_000)
        page.evaluate("() => MathJax.startup.promise")
    r = page.evaluate(PAGE_REPORT)
    page.close()
    if r["mathSource"] and r["mathTypeset"] < r["mathSource"]:
        problems.append(f"math typeset {r['mathTypeset']} of {r['mathSource']}")
    raw = RAW_TEX.search(r["text"])
    if raw:
        problems.append(f"raw TeX in the text: ...{r['text'][raw.start() - 40 : raw.end() + 40]!r}")
    problems += [f"image not loaded: {src}" for src in r["broken"]]
    problems += [f"code wider than the column: {line!r}" for line in r["wideCode"]]
    if r["withControls"] < r["animations"]:
        problems.append(f"animations with controls {r['withControls']} of {r['animations']}")
    summary = (
        f"{page_path.stem:20} math {r['mathTypeset']:4}/{r['mathSource']:<4} images {r['images']:3}"
        f"  animations {r['animations']}  column {r['column']} px"
    )
    print(summary + ("  OK" if not problems else "  FAILED"))
    return problems


def main(root: str = "_build/html") -> int:
    pages = sorted(Path(root).glob("book/*.html"))
    if not pages:
        print(f"no pages under {root}/book: run `make book` first")
        return 2
    failed = 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        for page_path in pages:
            problems = check_page(browser, page_path)
            failed += bool(problems)
            for problem in problems:
                print(f"    {problem}")
        browser.close()
    print(f"{len(pages) - failed} of {len(pages)} pages passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
