"""Sphinx extension of the book's translated editions: what Sphinx's i18n misses.

Display math (`$$ ... $$`, amsmath environments) is the same in every edition, but
Sphinx extracts each block as a message of TeX for translators to copy. It is marked
untranslatable here, so the catalogs hold prose only (inline math stays inside its
sentence's message, where tests/test_translations.py checks it is kept).

The part captions of `_toc.yml` ("The ideas", ...) are inserted by sphinx_external_toc's
transform (priority 100), after Sphinx's Locale transform (priority 20) has translated
the page: they would stay English in the Chinese sidebar, although the gettext builder
extracts them (into book/index.po, the root document's catalog). A transform translates
them from that catalog; it does nothing in the English and gettext builds.
"""

from __future__ import annotations

from pathlib import Path

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.locale import init as init_locale
from sphinx.transforms import SphinxTransform
from sphinx.util.i18n import docname_to_domain


class MathIsNotProse(SphinxTransform):
    default_priority = 5  # before Sphinx's i18n transforms (10, 20)

    def apply(self, **kwargs) -> None:
        for node in self.document.findall(nodes.math_block):
            node["translatable"] = False


class TranslateTocCaptions(SphinxTransform):
    default_priority = 110  # after sphinx_external_toc.events.InsertToctrees (100)

    def apply(self, **kwargs) -> None:
        language = self.config.language
        if not language or language == "en" or self.app.builder.name == "gettext":
            return
        toctrees = self.document.findall(addnodes.toctree)
        captioned = [n for n in toctrees if n.get("caption")]
        if not captioned:
            return
        domain = docname_to_domain(self.env.docname, self.config.gettext_compact)
        dirs = [str(Path(self.env.srcdir, d)) for d in self.config.locale_dirs]
        catalog, has_catalog = init_locale(dirs, language, domain)
        if has_catalog:
            for node in captioned:
                node["caption"] = catalog.gettext(node["caption"])


def setup(app: Sphinx) -> dict:
    app.add_transform(MathIsNotProse)
    app.add_transform(TranslateTocCaptions)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
