"""Sphinx configuration of guessgrad's documentation.

Build it (warnings are errors) with::

    pip install -e ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html

Pages are MyST Markdown; the API reference (api.md, api/*.md) is generated
from the docstrings (Google style, read by napoleon), and the coverage_check
extension (ext/coverage_check.py) fails the build when a public name has no
entry in it. The Colab notebooks (colab/*.ipynb) are copied into _notebooks/
(git-ignored) at each build and rendered as they are stored, without running
them: tests/test_notebooks.py runs every one.
"""

import inspect
import os
import pathlib
import re
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "ext"))
sys.path.insert(0, str(ROOT))

# Importing guessgrad starts no accelerator work, but keep the build on the CPU
# (and quiet) wherever it runs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn
from sphinx.errors import PycodeError
from sphinx.pycode import ModuleAnalyzer

import guessgrad


def _copy_notebooks() -> None:
    """colab/*.ipynb -> _notebooks/ (only what changed, so rebuilds stay incremental)."""
    target = DOCS / "_notebooks"
    target.mkdir(exist_ok=True)
    sources = {p.name: p for p in sorted((ROOT / "colab").glob("*.ipynb"))}
    for stale in target.glob("*.ipynb"):
        if stale.name not in sources:
            stale.unlink()
    for name, source in sources.items():
        copy = target / name
        if not copy.exists() or copy.read_bytes() != source.read_bytes():
            shutil.copyfile(source, copy)


_copy_notebooks()

project = "guessgrad"
author = "the guessgrad authors"
copyright = "2025, the guessgrad authors"
release = guessgrad.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "coverage_check",
]

exclude_patterns = ["_build", "**/.ipynb_checkpoints", "ext"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}

# MyST: $...$ and $$...$$ as math besides {math}, ::: fences, heading anchors
# for [text](page.md#heading) links.
myst_enable_extensions = ["amsmath", "colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3

# Notebooks are rendered as stored; the test suite runs them (smoke mode).
nb_execution_mode = "off"

# API reference: Google-style docstrings (Args:, Returns:, References:).
autosummary_generate = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# No network at build time: no intersphinx mappings.

html_theme = "sphinx_book_theme"
html_title = "guessgrad"
html_theme_options = {
    "repository_url": "https://github.com/guessgrad/guessgrad",
    "use_repository_button": True,
    "path_to_docs": "docs",
    "show_toc_level": 2,
}


def _constant_docstring(app, what, name, obj, options, lines) -> None:
    """A constant's docstring: the one under its definition in guessgrad.

    autodoc looks for a constant's docstring in the module it is documented
    under (``guessgrad.metrics``), not in the one that defines it
    (``guessgrad._src.metrics``), and otherwise shows its type's (``dict``'s).
    This finds the definition's docstring (the same name, the same object),
    or for an instance of a guessgrad class (``NEXT``) its class's, not
    napoleon's reading of it as ``type: description``.
    """
    if what != "data":
        return
    attr = name.rpartition(".")[2]
    for module_name, module in sorted(sys.modules.items()):
        if (
            not module_name.startswith("guessgrad")
            or getattr(module, attr, None) is not obj
        ):
            continue
        try:
            docs = ModuleAnalyzer.for_module(module_name).find_attr_docs()
        except PycodeError:
            continue
        if ("", attr) in docs:
            lines[:] = list(docs[("", attr)])
            return
    if type(obj).__module__.partition(".")[0] == "guessgrad":  # its class's, as written
        lines[:] = (inspect.getdoc(type(obj)) or "").splitlines()
    else:  # a builtin's (dict's, str's) or typing's
        lines[:] = []


_FLAX_FIELDS = re.compile(
    r"(, )?parent: [^=]*= <flax\.linen\.module\._Sentinel object>|(, )?name: str \| None = None"
)


def _class_signature(app, what, name, obj, options, signature, return_annotation):
    """Classes without the arguments no user passes.

    A protocol's ``(*args, **kwargs)`` (:class:`guessgrad.Estimator`) goes, and
    so do the ``parent`` and ``name`` every Flax module takes.
    """
    if what not in ("class", "exception") or signature is None:
        return None
    if signature == "(*args, **kwargs)":
        return "", return_annotation
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return _FLAX_FIELDS.sub("", signature).replace("(, ", "("), return_annotation
    return None


def setup(app):
    app.connect("autodoc-process-docstring", _constant_docstring)
    app.connect("autodoc-process-signature", _class_signature)
