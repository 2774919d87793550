"""Sphinx configuration for the sknlica documentation."""

import os

import sknlica

project = "sknlica"
author = "The sknlica developers"
copyright = "2026, The sknlica developers"
release = version = sknlica.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

autosummary_generate = True
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
# Cross-references only where they resolve; no network access at build time.
intersphinx_mapping = {}
templates_path = []
exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py"]
html_theme = "alabaster"

# The gallery is executed only when SKNLICA_DOCS_EXECUTE=1 (`make docs`); the
# test suite builds the docs without running the examples (they have their
# own test).
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "plot_gallery": os.environ.get("SKNLICA_DOCS_EXECUTE", "0") == "1",
    "download_all_examples": False,
    "within_subsection_order": "FileNameSortKey",
}
