"""Sphinx extension: the built HTML works without a network.

Two jobs:

1. **Maths from a local MathJax.** ``sphinx.ext.mathjax`` loads MathJax from a CDN by
   default, so offline every formula shows as raw LaTeX. The pip package
   ``sphinx-mathjax-offline`` (in the ``docs`` extra) ships MathJax 3.2.2; after a
   successful HTML build the parts the pages use are copied into
   ``_static/mathjax/`` and ``mathjax_path`` points there: the TeX-to-HTML component,
   its TeX extensions (loaded on demand), the HTML output's fonts, the context menu and
   its accessibility tools (with the speech rule engine's data).
2. **A check that nothing else is fetched from another host.** Every built page is
   parsed; a ``<script src>``, a ``<link>`` that loads something (stylesheet, preload,
   icon, manifest, preconnect), an ``<img>``, ``<iframe>``, ``<source>``, ``<embed>``,
   ``<object>`` or an ``@import`` / ``url(...)`` in a page's or ``_static``'s CSS that
   points at another host (``http:``, ``https:`` or ``//``) fails the build, naming the
   page and the URL. Links a reader follows (``<a href>``) are fine.
"""

import importlib.metadata
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

from sphinx.errors import ExtensionError
from sphinx.util import logging

LOGGER = logging.getLogger(__name__)
DISTRIBUTION = "sphinx-mathjax-offline"
ENTRY = "tex-chtml.js"  # MathJax's combined TeX input + HTML output component
# What tex-chtml.js loads from its own folder, on demand.
PARTS = ("input/tex/extensions", "output/chtml/fonts/woff-v2", "ui", "a11y", "sre")
EXTERNAL = re.compile(r"^\s*(?:[a-zA-Z][a-zA-Z0-9+.-]*:)?//", re.ASCII)
LOADING_LINKS = {"stylesheet", "preload", "modulepreload", "prefetch", "icon",
                 "shortcut", "apple-touch-icon", "manifest", "preconnect", "dns-prefetch"}
CSS_URL = re.compile(r"""@import\s+(?:url\()?\s*['"]?([^'")\s;]+)|url\(\s*['"]?([^'")]+)""")


def mathjax_folder():
    """The folder of the MathJax copy that ``sphinx-mathjax-offline`` installs."""
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ExtensionError(
            f"{DISTRIBUTION} is not installed; it supplies the local MathJax that makes "
            "the maths render offline. Install the docs extra: python3 -m pip install "
            '-r requirements.txt -e ".[docs]"') from exc
    folder = Path(distribution.locate_file("sphinx-mathjax-offline/static/mathjax"))
    if not (folder / ENTRY).is_file():
        raise ExtensionError(f"{DISTRIBUTION} has no {ENTRY} under {folder}.")
    return folder


def is_external(url):
    """Whether ``url`` points at another host (a scheme with ``//``, or ``//host``)."""
    return bool(url) and bool(EXTERNAL.match(url)) and not url.strip().startswith("file:")


def _css_urls(text):
    return [first or second for first, second in CSS_URL.findall(text)]


class _Resources(HTMLParser):
    """Collects the URLs a page loads by itself (not the links a reader follows)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.urls = []  # (what, url)
        self._style = False

    def handle_starttag(self, tag, attrs):
        attrs = {name: value or "" for name, value in attrs}
        if tag == "script" and attrs.get("src"):
            self.urls.append(("script", attrs["src"]))
        elif tag == "link" and attrs.get("href"):
            rels = set(attrs.get("rel", "").lower().split())
            if rels & LOADING_LINKS:
                self.urls.append((f"link rel={attrs.get('rel')}", attrs["href"]))
        elif tag in ("img", "iframe", "source", "embed", "audio", "video", "track"):
            for name in ("src", "srcset"):
                for url in attrs.get(name, "").split(","):
                    if url.strip():
                        self.urls.append((tag, url.strip().split()[0]))
        elif tag == "object" and attrs.get("data"):
            self.urls.append(("object", attrs["data"]))
        if attrs.get("style"):
            self.urls.extend(("style attribute", url) for url in _css_urls(attrs["style"]))
        self._style = tag == "style"

    def handle_endtag(self, tag):
        if tag == "style":
            self._style = False

    def handle_data(self, data):
        if self._style:
            self.urls.extend(("style", url) for url in _css_urls(data))


def external_resources(html):
    """``(what, url)`` of every resource the page ``html`` would fetch from another host.

    >>> external_resources('<script src="https://cdn.example/x.js"></script>'
    ...                    '<a href="https://example.org">a link</a>'
    ...                    '<script src="_static/mathjax/tex-chtml.js"></script>')
    [('script', 'https://cdn.example/x.js')]
    """
    parser = _Resources()
    parser.feed(html)
    return [(what, url) for what, url in parser.urls if is_external(url)]


def find_external(outdir):
    """``(file, what, url)`` for every external resource in the built site at ``outdir``."""
    outdir = Path(outdir)
    found = []
    for page in sorted(outdir.rglob("*.html")):
        for what, url in external_resources(page.read_text(encoding="utf-8",
                                                           errors="replace")):
            found.append((page.relative_to(outdir).as_posix(), what, url))
    static = outdir / "_static"
    for sheet in sorted(static.rglob("*.css")) if static.is_dir() else []:
        for url in _css_urls(sheet.read_text(encoding="utf-8", errors="replace")):
            if is_external(url):
                found.append((sheet.relative_to(outdir).as_posix(), "css", url))
    return found


def _copy_mathjax(outdir):
    source = mathjax_folder()
    target = Path(outdir) / "_static" / "mathjax"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / ENTRY, target / ENTRY)
    for part in PARTS:
        if (source / part).is_dir():
            shutil.copytree(source / part, target / part, dirs_exist_ok=True)
    for name in ("LICENSE",):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def _config_inited(app, config):
    mathjax_folder()  # fail early, naming the package, when it is missing
    config.mathjax_path = f"mathjax/{ENTRY}"


def _build_finished(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    _copy_mathjax(app.outdir)
    found = find_external(app.outdir)
    if found:
        listing = "\n".join(f"  {page}: {what} {url}" for page, what, url in found[:50])
        raise ExtensionError(
            f"{len(found)} resource(s) of the built HTML come from another host, so the "
            f"pages would not work offline:\n{listing}\nShip them under _static instead.")
    LOGGER.info("offline_html: MathJax copied to _static/mathjax; no page loads anything "
                "from another host")


def setup(app):
    app.connect("config-inited", _config_inited)
    app.connect("build-finished", _build_finished)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
