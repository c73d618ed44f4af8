"""Every public name of guessgrad has an entry in the API reference.

A name is public when it is in the ``__all__`` of a public module (or, for a
module without ``__all__``, a non-underscore attribute defined there). The
public modules are ``guessgrad``, ``guessgrad.experiment`` and every module
their ``__all__`` names (``guessgrad.estimators``, ``guessgrad.rules``, ...).

A name has an entry when an autodoc directive (``autofunction``,
``autoclass``, ``autodata``, ``automodule``, ...) documents it, or documents
the same object under the same name in another public module (a re-export,
such as ``guessgrad.estimators.get_estimator`` of ``guessgrad.get_estimator``).

Two ways to run it:

* as a Sphinx extension (``extensions = ["coverage_check"]``): the build warns,
  naming each missing name, and fails under ``sphinx-build -W``;
* as plain functions, without Sphinx: :func:`check` reads the reference's
  Markdown sources (MyST directives) and returns the problems found, which is
  what ``tests/test_docs.py`` does.

:func:`check` also holds each page's ``autosummary`` table to its entries: the
table lists exactly the names the page documents.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
import re
import types
from collections.abc import Iterable, Mapping
from typing import Any

#: Where the search for public modules starts.
ROOTS = ("guessgrad", "guessgrad.experiment")

_KINDS = ("attribute", "class", "data", "decorator", "exception", "function", "method")

#: The directives that document a name (and register it with Sphinx): autodoc's,
#: and the Python domain's written by hand (``.. py:function::``).
DOCUMENTING = frozenset(_KINDS + ("module", "property")) | {
    f"auto{kind}" for kind in _KINDS + ("module", "property")
}

_FENCE_OPEN = re.compile(r"^(?P<fence>`{3,}|~{3,})\{(?P<name>[\w:-]+)\}\s*(?P<arg>.*)$")
_RST_DIRECTIVE = re.compile(r"^\.\.\s+(?:py:)?(?P<name>[\w-]+)::\s*(?P<arg>.*)$")


def public_modules(roots: Iterable[str] = ROOTS) -> dict[str, types.ModuleType]:
    """The roots and every module their ``__all__`` names, recursively."""
    found: dict[str, types.ModuleType] = {}
    todo = [importlib.import_module(name) for name in roots]
    while todo:
        module = todo.pop()
        if module.__name__ in found:
            continue
        found[module.__name__] = module
        for name in _exported(module):
            value = getattr(module, name)
            if isinstance(value, types.ModuleType):
                todo.append(value)
    return dict(sorted(found.items()))


def public_names(roots: Iterable[str] = ROOTS) -> dict[str, Any]:
    """``{"guessgrad.site": site, ...}``: every public name, with its object."""
    return {
        f"{module_name}.{name}": getattr(module, name)
        for module_name, module in public_modules(roots).items()
        for name in _exported(module)
    }


def _exported(module: types.ModuleType) -> list[str]:
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and getattr(value, "__module__", module.__name__) == module.__name__
    ]


def missing_names(public: Mapping[str, Any], documented: Iterable[str]) -> list[str]:
    """The public names without an entry, sorted.

    Args:
      public: full name -> object, as :func:`public_names` returns.
      documented: the full names the reference documents.

    Returns:
      Each name of ``public`` that is neither documented itself nor a
      re-export (the same name, the same object) of a documented public name.
    """
    documented = set(documented)
    by_name: dict[str, list[Any]] = {}
    for full in documented & set(public):
        by_name.setdefault(full.rpartition(".")[2], []).append(public[full])
    missing = []
    for full, value in public.items():
        if full in documented:
            continue
        if any(value is other for other in by_name.get(full.rpartition(".")[2], ())):
            continue
        missing.append(full)
    return sorted(missing)


@dataclasses.dataclass
class Page:
    """What one reference page documents and what its autosummary tables list."""

    path: pathlib.Path
    modules: set[str] = dataclasses.field(default_factory=set)
    documented: set[str] = dataclasses.field(default_factory=set)
    summarized: set[str] = dataclasses.field(default_factory=set)


def read_page(path: str | pathlib.Path) -> Page:
    """The entries of one MyST Markdown page of the reference.

    Reads fenced directives (```` ```{autofunction} site ````) and, inside
    ```` ```{eval-rst} ```` blocks, reStructuredText ones
    (``.. autofunction:: site``). A bare name is resolved against the current
    module (``currentmodule`` or ``module``; not ``automodule``, whose module
    Sphinx forgets after it) as Sphinx resolves it.
    """
    path = pathlib.Path(path)
    page = Page(path)
    current: str | None = None
    for name, arg, content in _directives(path.read_text(encoding="utf-8")):
        if name in ("currentmodule", "module"):  # automodule's ends with it
            current = None if arg in ("", "None") else arg
        if name in ("module", "automodule"):
            page.modules.add(arg)
        elif name in DOCUMENTING:
            page.documented.add(_resolve(arg, current))
        elif name == "autosummary":
            for line in content:
                entry = line.strip()
                if entry and not entry.startswith(":"):
                    page.summarized.add(_resolve(entry.lstrip("~"), current))
    return page


def _resolve(name: str, current: str | None) -> str:
    name = name.split("(")[0].strip()  # autofunction:: f(x) with an explicit signature
    if current and _importable(f"{current}.{name}"):
        return f"{current}.{name}"
    return name


def _importable(full: str) -> bool:
    module_name, _, attr = full.partition(".")
    try:
        value: Any = importlib.import_module(module_name)
    except ImportError:
        return False
    for part in attr.split(".") if attr else ():
        if hasattr(value, part):
            value = getattr(value, part)
            continue
        try:
            value = importlib.import_module(f"{value.__name__}.{part}")
        except (AttributeError, ImportError):
            return False
    return True


def _directives(text: str) -> Iterable[tuple[str, str, list[str]]]:
    """``(name, argument, content lines)`` of every directive, in order."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE_OPEN.match(lines[i].strip())
        i += 1
        if not match:
            continue
        fence = match["fence"]
        content = []
        while i < len(lines) and lines[i].strip() != fence:
            content.append(lines[i])
            i += 1
        i += 1
        if match["name"] == "eval-rst":
            yield from _rst_directives(content)
        else:
            yield match["name"].removeprefix("py:"), match["arg"].strip(), content


def _rst_directives(lines: list[str]) -> Iterable[tuple[str, str, list[str]]]:
    i = 0
    while i < len(lines):
        match = _RST_DIRECTIVE.match(lines[i].strip())
        indent = len(lines[i]) - len(lines[i].lstrip())
        i += 1
        if not match:
            continue
        content = []
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
        ):
            content.append(lines[i])
            i += 1
        yield match["name"], match["arg"].strip(), content


def check(
    paths: Iterable[str | pathlib.Path],
    public: Mapping[str, Any] | None = None,
    documented: Iterable[str] | None = None,
) -> list[str]:
    """Problems with the reference made of the pages at ``paths`` (empty: none).

    Args:
      paths: the reference's Markdown pages.
      public: full name -> object; default :func:`public_names`.
      documented: the full names documented (modules included), as a Sphinx
        build registered them; default: the names the pages' directives
        document.

    Returns:
      One message naming the public names without an entry (if any), and one
      per page whose autosummary tables and entries name different sets.
    """
    public = public_names() if public is None else public
    pages = [read_page(p) for p in paths]
    if documented is None:
        documented = set().union(*(p.modules | p.documented for p in pages))
    problems = []
    missing = missing_names(public, documented)
    if missing:
        problems.append(
            "public names without an entry in the API reference (docs/api/): "
            + ", ".join(missing)
        )
    for page in pages:
        if page.summarized - page.documented:
            problems.append(
                f"{page.path}: in an autosummary table but without an entry: "
                + ", ".join(sorted(page.summarized - page.documented))
            )
        if page.documented - page.summarized:
            problems.append(
                f"{page.path}: documented but missing from the autosummary table: "
                + ", ".join(sorted(page.documented - page.summarized))
            )
    return problems


def api_pages(docs: str | pathlib.Path) -> list[pathlib.Path]:
    """The reference's pages under the docs directory: api.md and api/*.md."""
    docs = pathlib.Path(docs)
    return [
        p for p in (docs / "api.md", *sorted((docs / "api").glob("*.md"))) if p.exists()
    ]


def _check_build(app: Any, env: Any) -> None:
    """Sphinx's env-check-consistency: a warning per problem :func:`check` finds."""
    from sphinx.util import logging

    registered = {name for name, *_ in env.get_domain("py").get_objects()}
    for problem in check(api_pages(app.srcdir), documented=registered):
        logging.getLogger(__name__).warning(problem, type="coverage_check")


def setup(app: Any) -> dict[str, Any]:
    """Registers the check with Sphinx (``extensions = ["coverage_check"]``)."""
    app.connect("env-check-consistency", _check_build)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
