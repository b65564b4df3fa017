"""Open every page of the built book in headless Chromium with the network off, as a reader would.

Checks per page: every request stays inside the site (anything else is blocked and reported);
math is typeset by MathJax (its output elements present, no raw TeX left in the visible text);
every image has loaded; every animation shows its controls; no code cell needs a horizontal
scroll bar; the console has no errors. Also
reports the width of the text column, which `ddpm_lib.plotting.PAGE_WIDTH` is sized for.

Every page also carries the link to the same page in the other edition (it must point to a
built file of the same name). On a Chinese page (<html lang="zh-CN">) the Chinese text must be
drawn with a CJK font that has its glyphs (no tofu boxes): Chromium reports the fonts it used for
the title and the first paragraph.

Usage (after `make book`): `make browser-check`, or
python .ci/browser_check.py [_build/html [_build/html/zh ...]]   (each folder one edition)
Needs Debian's chromium (/usr/bin/chromium), a CJK font (fonts-noto-cjk) for the Chinese pages,
and the playwright package (no browser download).
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
CJK = re.compile(r"[\u4e00-\u9fff]")
# Fonts of the zh edition's stack (book/_static/ddpm.css) that hold CJK glyphs.
CJK_FONTS = re.compile(r"CJK|Source Han|PingFang|Hiragino|YaHei|WenQuanYi|Droid Sans Fallback")

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


def cjk_fonts(page) -> dict[str, list[str]]:
    """The fonts Chromium drew the Chinese title and first Chinese paragraph with."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("DOM.enable")
    cdp.send("CSS.enable")
    root = cdp.send("DOM.getDocument")["root"]["nodeId"]
    used = {}
    for selector in ("article h1", "article p"):
        for node in cdp.send("DOM.querySelectorAll", {"nodeId": root, "selector": selector})[
            "nodeIds"
        ][:40]:
            html = cdp.send("DOM.getOuterHTML", {"nodeId": node})["outerHTML"]
            if CJK.search(re.sub(r"<[^>]+>", "", html)):
                fonts = cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]
                used[selector] = [f"{f['familyName']} ({f['glyphCount']})" for f in fonts]
                break
    cdp.detach()
    return used


def check_language_link(page, page_path: Path) -> list[str]:
    link = page.locator("a.ddpm-other-language")
    if link.count() != 1:
        return [f"language link: {link.count()} found, expected 1"]
    target = page.evaluate("() => document.querySelector('a.ddpm-other-language').href")
    if not target.startswith("file:"):
        return [f"language link leaves the site: {target}"]
    other = Path(target.removeprefix("file://").split("#")[0])
    if not other.is_file():
        return [f"language link to a missing page: {other}"]
    if other.name != page_path.name or other.resolve() == page_path.resolve():
        return [f"language link to another page: {other}"]
    return []


def check_page(browser, page_path: Path) -> list[str]:
    """Load one page; return the problems found (empty when it reads as it should)."""
    problems: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})

    def console(message):
        if message.type == "error":
            problems.append(f"console: {message.text}")

    page.on("console", console)
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
    problems += check_language_link(page, page_path)
    chinese = page.evaluate("() => document.documentElement.lang").startswith("zh")
    # DevTools' CSS domain logs a console error of its own on file: pages: stop listening first.
    page.remove_listener("console", console)
    fonts = cjk_fonts(page) if chinese else {}
    page.close()
    if chinese:
        for selector in ("article h1", "article p"):
            used = fonts.get(selector)
            if not used:
                problems.append(f"no Chinese text in {selector}: untranslated page?")
            elif not any(CJK_FONTS.search(f) for f in used):
                problems.append(f"Chinese {selector} drawn without a CJK font (tofu): {used}")
    if r["mathSource"] and r["mathTypeset"] < r["mathSource"]:
        problems.append(f"math typeset {r['mathTypeset']} of {r['mathSource']}")
    raw = RAW_TEX.search(r["text"])
    if raw:
        problems.append(f"raw TeX in the text: ...{r['text'][raw.start() - 40 : raw.end() + 40]!r}")
    problems += [f"image not loaded: {src}" for src in r["broken"]]
    problems += [f"code wider than the column: {line!r}" for line in r["wideCode"]]
    if r["withControls"] < r["animations"]:
        problems.append(f"animations with controls {r['withControls']} of {r['animations']}")
    cjk = next((f for f in fonts.get("article p", []) if CJK_FONTS.search(f)), "")
    name = f"{page_path.parent.parent.name}/{page_path.stem}"
    summary = (
        f"{name:24} math {r['mathTypeset']:4}/{r['mathSource']:<4} images {r['images']:3}"
        f"  animations {r['animations']}  column {r['column']} px"
        + (f"  font {cjk}" if cjk else "")
    )
    print(summary + ("  OK" if not problems else "  FAILED"))
    return problems


def main(*roots: str) -> int:
    pages = []
    for root in roots or ("_build/html",):
        found = sorted(Path(root).glob("book/*.html"))
        if not found:
            print(f"no pages under {root}/book: run `make book` first")
            return 2
        pages += found
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
