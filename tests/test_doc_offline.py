"""The documentation's offline check (``doc/_ext/offline_html.py``).

The docs build runs the check on every page it writes; these tests pin what the check
counts as loading something from another host, and that the local MathJax it copies is
where the extension looks for it (skipped without the ``docs`` extra).
"""

import importlib.util
import sys
from pathlib import Path

import pytest

EXT = Path(__file__).resolve().parents[1] / "doc" / "_ext"
sys.path.insert(0, str(EXT))
offline_html = pytest.importorskip("offline_html", reason="needs Sphinx (the docs extra)")


def test_resources_a_page_loads_from_another_host_are_found():
    page = """
    <html><head>
      <script src="https://cdn.example.org/mathjax/tex-chtml.js"></script>
      <script src="_static/mathjax/tex-chtml.js"></script>
      <script>window.MathJax = {"tex": {}}</script>
      <link rel="stylesheet" href="//fonts.example.org/font.css">
      <link rel="preconnect" href="https://fonts.example.org">
      <link rel="stylesheet" href="_static/theme.css">
      <link rel="canonical" href="https://example.org/page.html">
      <style>@import url("https://example.org/a.css"); p {background: url(img.png)}</style>
    </head><body>
      <a href="https://example.org/paper.pdf">a link a reader follows</a>
      <img src="https://example.org/logo.png"> <img src="_images/fig.png">
      <div style="background-image: url('http://example.org/bg.png')"></div>
    </body></html>
    """
    found = offline_html.external_resources(page)
    assert [url for _, url in found] == [
        "https://cdn.example.org/mathjax/tex-chtml.js",
        "//fonts.example.org/font.css",
        "https://fonts.example.org",
        "https://example.org/a.css",
        "https://example.org/logo.png",
        "http://example.org/bg.png",
    ]


def test_find_external_reads_every_page_and_stylesheet(tmp_path):
    (tmp_path / "guide").mkdir()
    (tmp_path / "_static").mkdir()
    (tmp_path / "index.html").write_text('<script src="_static/local.js"></script>')
    (tmp_path / "guide" / "page.html").write_text(
        '<script src="https://cdn.example.org/x.js"></script>')
    (tmp_path / "_static" / "theme.css").write_text(
        "@font-face {src: url(https://example.org/font.woff2)}")
    assert offline_html.find_external(tmp_path) == [
        ("guide/page.html", "script", "https://cdn.example.org/x.js"),
        ("_static/theme.css", "css", "https://example.org/font.woff2"),
    ]
    (tmp_path / "guide" / "page.html").write_text('<a href="https://example.org">x</a>')
    (tmp_path / "_static" / "theme.css").write_text("p {background: url(img.png)}")
    assert offline_html.find_external(tmp_path) == []


@pytest.mark.skipif(importlib.util.find_spec("sphinx-mathjax-offline") is None,
                    reason="sphinx-mathjax-offline (the docs extra) is not installed")
def test_the_local_mathjax_has_what_the_pages_load():
    folder = offline_html.mathjax_folder()
    assert (folder / offline_html.ENTRY).is_file()
    for part in offline_html.PARTS[:2]:  # TeX extensions and the HTML output's fonts
        assert any((folder / part).iterdir()), part
