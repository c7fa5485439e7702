"""Sphinx configuration of the skmsif documentation.

Build it from the repository root (warnings are errors)::

    python3 -m sphinx -W --keep-going -b html doc doc/_build/html
"""

import os
import sys
from pathlib import Path

# Examples run in the gallery on two CPU cores: one thread per BLAS call is the fastest.
for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "doc" / "_ext"))  # this site's own extensions

import skmsif  # noqa: E402

project = "skmsif"
author = "the skmsif developers"
copyright = "2026, the skmsif developers"
release = skmsif.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
    # doc/_ext/offline_html.py: MathJax from a local copy (sphinx-mathjax-offline), and a
    # check that no built page loads anything from another host.
    "offline_html",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "auto_examples/*.ipynb",
                    "auto_examples/*.py", "auto_examples/*.zip", "auto_examples/*.md5",
                    "auto_examples/*.codeobj.json", "auto_examples/*.pickle"]
templates_path = ["_templates"]

# --- API reference -------------------------------------------------------------------
autosummary_generate = True
autodoc_default_options = {"members": True, "inherited-members": False}
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
# Every documented object is validated ("all"), except for these checks. tests/test_docs.py
# reads this set, so the test suite and the build enforce the same rules.
numpydoc_validation_checks = {
    "all",
    "GL01",  # the summary may start on the line of the opening quotes
    "ES01",  # an extended summary is optional
    "SA01",  # a See Also section is optional
    "EX01",  # examples are required of classes and functions (tests/test_docs.py), not methods
    "SS05",  # "Compute ..." and "Computes ..." are both fine
    "RT02",  # a return type may be followed by a name
}
# Members that PyTorch and scikit-learn define and document in their own style.
numpydoc_validation_exclude = {r"\.__init__$", r"\.set_.*_request$"}

# --- Markdown pages ---------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# --- Example gallery: every script in examples/ runs, and its figures are embedded --------
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r".*\.py$",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "matplotlib_animations": False,
    "show_memory": False,
    "default_thumb_file": None,
    "write_computation_times": False,
}

# --- HTML ----------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"skmsif {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_static_path = []
html_show_sourcelink = False


def _skip_metadata_request_methods(app, what, name, obj, skip, options):
    """Leave out the ``set_*_request`` methods scikit-learn adds to every estimator."""
    if name.startswith("set_") and name.endswith("_request"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_metadata_request_methods)
