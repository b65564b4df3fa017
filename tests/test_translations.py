"""The Chinese edition is complete and in step with the English (issue 16).

The messages are extracted afresh from the current sources (the gettext builder, once per test
session, into a temporary folder) and compared with the catalogs in locales/zh_CN/LC_MESSAGES/.
A message fails when it is missing from its catalog, untranslated, fuzzy, when its translation lost
a piece of the English's inline markup (math, inline code, a role and its target, a link target)
or a number, or when Markdown would not read the translation as one paragraph (Sphinx then keeps
the English without a word). Fix: `make translations`, then translate what it reports.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from babel.messages.pofile import read_po
from markdown_it import MarkdownIt
from mdit_py_plugins.dollarmath import dollarmath_plugin

ROOT = Path(__file__).resolve().parent.parent
LOCALE = ROOT / "locales" / "zh_CN" / "LC_MESSAGES"
SHOWN = 12  # problems listed per catalog


def toc_documents() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"]] + [c["file"] for part in toc.get("parts", []) for c in part["chapters"]]


DOCUMENTS = toc_documents()


@pytest.fixture(scope="session")
def templates(tmp_path_factory) -> Path:
    """The message templates (.pot) of the current sources: one gettext build, about 4 s."""
    out = tmp_path_factory.mktemp("i18n") / "gettext"
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "build_book.py"), "gettext", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, f"gettext build failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    print(f"gettext build: {time.perf_counter() - start:.1f} s")
    return out


# --- what a message's inline markup is ------------------------------------------------------------

ROLE = re.compile(r"\{[\w:-]+\}`([^`]*)`")  # {ref}`sec-why`, {doc}`text <target>`
CODE = re.compile(r"(`+)(.+?)\1")
MATH = re.compile(r"\$\$.+?\$\$|\$[^$\n]+?\$", re.DOTALL)
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title")
AUTOLINK = re.compile(r"<((?:https?|mailto):[^>\s]+)>")
# A number of the prose ("31", "93.5%", "10,000", "2e-4"'s 4), not a word such as "2-D" or "5x".
# ASCII word characters only: Chinese writes numbers against its characters ("算法1", "6倍").
NUMBER = re.compile(r"(?<![A-Za-z0-9_.])\d+(?:[.,]\d+)*(?![A-Za-z0-9_-]|[.,]\d)")


def _role_token(match: re.Match) -> str:
    role, body = match.group(0).split("`", 1)[0], match.group(1)
    explicit = re.fullmatch(r"(?s).*?<([^<>]+)>\s*", body)  # the title is prose; the target is not
    return f"{role}`{explicit.group(1) if explicit else body}`"


def inline_markup(text: str) -> tuple[set[str], str]:
    """The pieces of inline markup in a message, and the prose left when they are taken out."""
    pieces: set[str] = set()

    def take(pattern: re.Pattern, token) -> None:
        nonlocal text

        def cut(m: re.Match) -> str:
            pieces.add(token(m))
            return " "

        text = pattern.sub(cut, text)

    take(ROLE, _role_token)
    take(CODE, lambda m: m.group(0))
    take(MATH, lambda m: re.sub(r"\s+", " ", m.group(0)))
    take(LINK, lambda m: f"]({m.group(1)})")
    take(AUTOLINK, lambda m: f"<{m.group(1)}>")
    return pieces, text


def needs_translation(msgid: str) -> bool:
    """False for messages with no words outside markup ("0", "93.5%", "`cpu`", "$x_t$"): Sphinx
    shows the English for an empty translation, and it is the same in Chinese."""
    return bool(re.search(r"[A-Za-z]", inline_markup(msgid)[1]))


def lost_markup(msgid: str, msgstr: str) -> list[str]:
    """Markup and numbers of the English that the translation does not have."""
    en_markup, en_prose = inline_markup(msgid)
    zh_markup, zh_prose = inline_markup(msgstr)
    lost = sorted(en_markup - zh_markup)
    numbers = set(NUMBER.findall(en_prose)) - set(NUMBER.findall(zh_prose))
    return lost + [f"the number {n}" for n in sorted(numbers)]


MARKDOWN = MarkdownIt("commonmark").enable("table").use(dollarmath_plugin)


def is_one_paragraph(msgstr: str) -> bool:
    """Sphinx parses a translation as Markdown and uses it only if it is a single paragraph:
    "1. 为什么" is a list (write "1\\. 为什么"), "# x" a heading."""
    tokens = MARKDOWN.parse(msgstr)
    blocks = [t.type for t in tokens if t.level == 0 and t.nesting >= 0 and t.block]
    return (
        blocks[:1] == ["paragraph_open"]
        and blocks.count("paragraph_open") == 1
        and all(b in ("paragraph_open", "inline") for b in blocks)
    )


def short(text: str, width: int = 72) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[: width - 1] + "…")


def catalog_problems(pot: Path, po: Path) -> list[str]:
    """Everything wrong with one catalog, one line each."""
    with pot.open("rb") as f:
        wanted = [m.id for m in read_po(f) if m.id]
    if not po.is_file():
        return [f"no catalog (run `make translations`): {len(wanted)} messages to translate"]
    with po.open("rb") as f:
        catalog = read_po(f)
    problems = []
    for msgid in wanted:
        entry = catalog.get(msgid)
        if entry is None:
            problems.append(f"missing from the catalog (run `make translations`): {short(msgid)}")
        elif entry.fuzzy:
            problems.append(f"fuzzy (the English changed; check it, drop the flag): {short(msgid)}")
        elif not entry.string:
            if needs_translation(msgid):
                problems.append(f"untranslated: {short(msgid)}")
        elif lost := lost_markup(msgid, entry.string):
            problems.append(f"lost {', '.join(lost)}: {short(msgid)}")
        elif entry.string != msgid and not is_one_paragraph(entry.string):
            problems.append(
                f"not one Markdown paragraph (Sphinx would show the English; escape a leading "
                f"'1.' as '1\\.'): {short(entry.string)}"
            )
    return problems


@pytest.mark.parametrize("docname", DOCUMENTS)
def test_every_message_is_translated(templates, docname):
    pot = templates / f"{docname}.pot"
    assert pot.is_file(), f"the gettext build made no {pot.name}"
    po = LOCALE / f"{docname}.po"
    problems = catalog_problems(pot, po)
    listed = "\n  ".join(problems[:SHOWN])
    more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    if problems:
        pytest.fail(
            f"{po.relative_to(ROOT)}: {len(problems)} problems\n  {listed}{more}\n"
            "Fix: `make translations` (changed English turns fuzzy), then translate them.",
            pytrace=False,
        )


# --- the comparison itself -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "msgid, msgstr, lost",
    [
        ("the noise at step $t$", "第 $t$ 步的噪声", []),
        ("the noise at step $t$", "第 t 步的噪声", ["$t$"]),
        ("call `q_sample` once", "调用一次 q_sample", ["`q_sample`"]),
        ("see {ref}`sec-why`", "见 {ref}`sec-why`", []),
        ("see {ref}`sec-why`", "见 {ref}`sec-ink`", ["{ref}`sec-why`"]),
        ("see {ref}`the box <sec-why>`", "见 {ref}`方框 <sec-why>`", []),
        ("the [next chapter](02_why_gaussian.ipynb)", "[下一章](02_why_gaussian.ipynb)", []),
        (
            "the [next chapter](02_why_gaussian.ipynb)",
            "[下一章](03_forward_process.ipynb)",
            ["](02_why_gaussian.ipynb)"],
        ),
        ("on CSDN (<https://blog.csdn.net/x>)", "发表于 CSDN", ["<https://blog.csdn.net/x>"]),
        ("31 of the 2000 samples, 93.5%", "2000 个样本中的 31 个（93.5%）", []),
        ("31 of the 2000 samples", "2000 个样本中的 13 个", ["the number 31"]),
        ("a 2-D point, 6.18x the loss", "一个二维点，损失的 6.18 倍", []),
        ("$$\na + b\n$$ holds", "$$ a + b $$ 成立", []),  # whitespace inside math may change
        ("`x` and $x$ and `x`", "$x$ 与 `x`", []),  # each piece once is enough
    ],
)
def test_lost_markup(msgid, msgstr, lost):
    assert lost_markup(msgid, msgstr) == lost


@pytest.mark.parametrize(
    "msgid, needed",
    [
        ("0", False),
        ("93.5%", False),
        ("`cpu`", False),
        ("$x_t$", False),
        ("-", False),
        ("GAN", True),
        ("in `ddpm_lib`", True),
        ("中心极限定理", False),
    ],
)
def test_needs_translation(msgid, needed):
    assert needs_translation(msgid) is needed


@pytest.mark.parametrize(
    "msgstr, ok",
    [
        ("1\\. 为什么是扩散模型", True),
        ("1. 为什么是扩散模型", False),
        ("1.5 原因", True),
        ("- 一项", False),
        ("# 标题", False),
        ("*对应原文：背景。*", True),
        ("$$ a $$", False),
        ("第一段\n\n第二段", False),
        ("一行\n接着一行", True),
    ],
)
def test_is_one_paragraph(msgstr, ok):
    assert is_one_paragraph(msgstr) is ok


def test_a_changed_english_sentence_fails(tmp_path):
    """End to end on a small catalog: a message whose English changed is reported."""
    pot, po = tmp_path / "a.pot", tmp_path / "a.po"
    pot.write_text('msgid ""\nmsgstr ""\n\nmsgid "The noise grows."\nmsgstr ""\n')
    po.write_text(
        'msgid ""\nmsgstr ""\n"Content-Type: text/plain; charset=UTF-8\\n"\n\n'
        'msgid "The noise grows slowly."\nmsgstr "噪声缓慢增长。"\n'
    )
    assert catalog_problems(pot, po) == [
        "missing from the catalog (run `make translations`): 'The noise grows.'"
    ]
