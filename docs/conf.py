"""Sphinx configuration of the hyperlit documentation (API reference from the docstrings, plus the Markdown pages).

Build (as ``.ci/run`` does, warnings are errors)::

    sphinx-build -W --keep-going -b html docs build/docs
"""

from typing import Any

from sphinx.application import Sphinx

import hyperlit

project = "hyperlit"
author = "hyperlit contributors"
copyright = "hyperlit contributors"
release = version = hyperlit.__version__

extensions = [
    "sphinx.ext.autodoc",  # API pages from the docstrings
    "sphinx.ext.napoleon",  # Google-style "Args:" / "Returns:" sections
    "sphinx.ext.viewcode",  # "[source]" links to the highlighted code
    "myst_parser",  # README.md, docs/*.md
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# --- autodoc / napoleon ---------------------------------------------------------------------------------------
# Every object is documented once, under the module that defines it (docs/api/*.rst use ``automodule ... :members:``
# on the defining modules; the packages' re-exports are not documented a second time).
autodoc_default_options = {"member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
# Overrides without a docstring of their own (Lightning hooks) are not listed: Lightning's docstrings use roles and
# labels of its own documentation.
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" sections become ``:ivar:`` fields rather than ``.. attribute::`` entries, which would describe
# dataclass fields a second time (duplicate object warnings).
napoleon_use_ivar = True
napoleon_use_rtype = False

# --- MyST (Markdown) ------------------------------------------------------------------------------------------
# GitHub-style anchors for "#1-stn-against-random-search-..." links in docs/benchmarks.md and the README.
myst_heading_anchors = 4

# --- HTML -----------------------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"hyperlit {release}"

# Every cross-reference must resolve (a wrong path in a docstring fails the build), except to the third-party
# libraries: the build is offline (no intersphinx), so their names in signatures and docstrings stay unlinked. A new
# third-party package named in a signature goes into this list.
nitpicky = True
_THIRD_PARTY = (
    "Tensor",
    "abc",
    "collections",
    "datasets",
    "jsonargparse",
    "lightning",
    "matplotlib",
    "numpy",
    "pandas",
    "pathlib",
    "scipy",
    "torch",
    "torchmetrics",
    "torchvision",
)
nitpick_ignore_regex = [(r"py:.*", "(" + "|".join(_THIRD_PARTY) + r")(\..*)?")]


def _public_bases(app: Sphinx, name: str, obj: object, options: dict[str, Any], bases: list[Any]) -> None:
    """Show a private base class (``_StnImageNet``) as the public classes it derives from ("Bases:" lines)."""

    def expand(base: Any) -> list[Any]:
        if isinstance(base, type) and base.__name__.startswith("_"):
            return [b for parent in base.__bases__ for b in expand(parent)]
        return [base]

    public = []
    for base in bases:
        for b in expand(base):
            if b not in public:
                public.append(b)
    bases[:] = public


def setup(app: Sphinx) -> None:
    """Sphinx entry point of this configuration."""
    app.connect("autodoc-process-bases", _public_bases)
