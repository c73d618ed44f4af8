"""The documentation: every public name in the API reference, every example runs, the site builds.

Every fenced ```` ```python ```` block of README.md and of docs/**/*.md runs
as written, in order, in one namespace per file (with ``GUESSGRAD_SMOKE=1``,
in a temporary directory, loops of more than 3 steps cut to 3). A block that
must not run is fenced as something else (```` ```text ````, ```` ```bash ````).
"""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _load_coverage_check():
    spec = importlib.util.spec_from_file_location(
        "coverage_check", DOCS / "ext" / "coverage_check.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


coverage_check = _load_coverage_check()


def test_every_public_name_has_an_api_entry():
    pages = coverage_check.api_pages(DOCS)
    assert pages, "no API reference under docs/"
    assert coverage_check.check(pages) == []


def test_coverage_check_names_what_is_missing(tmp_path):
    """On a small fake reference: a name without an entry is reported, a re-export is not."""
    import guessgrad as gg

    public = {
        "guessgrad.site": gg.site,
        "guessgrad.tap": gg.tap,
        "guessgrad.GuessRule": gg.GuessRule,  # re-exported from guessgrad.rules
        "guessgrad.rules.GuessRule": gg.rules.GuessRule,
        "guessgrad.rules.wt": gg.rules.wt,
        "guessgrad.estimators.wt": gg.estimators.wt,  # the same name, not the same object
    }
    page = tmp_path / "api.md"
    page.write_text(
        "# Reference\n\n"
        "```{currentmodule} guessgrad\n```\n\n"
        "```{autofunction} site\n```\n\n"
        "```{eval-rst}\n"
        ".. currentmodule:: guessgrad.rules\n\n"
        ".. autosummary::\n   :nosignatures:\n\n   GuessRule\n   wt\n   guessgrad.site\n\n"
        ".. autoclass:: GuessRule\n   :members:\n\n"
        ".. autofunction:: wt\n"
        "```\n"
    )
    entries = coverage_check.read_page(page)
    assert entries.documented == {
        "guessgrad.site",
        "guessgrad.rules.GuessRule",
        "guessgrad.rules.wt",
    }
    assert coverage_check.missing_names(public, entries.documented) == [
        "guessgrad.estimators.wt",
        "guessgrad.tap",
    ]
    problems = coverage_check.check([page], public)
    assert len(problems) == 1
    assert "guessgrad.estimators.wt, guessgrad.tap" in problems[0]

    # A name in an autosummary table needs an entry on the same page, and the
    # reverse.
    page.write_text(page.read_text().replace("   wt\n", "   wt\n   as_rule\n"))
    page.write_text(page.read_text().replace("   GuessRule\n", ""))
    problems = coverage_check.check([page], public)
    assert any("without an entry: guessgrad.rules.as_rule" in p for p in problems)
    assert any(
        "missing from the autosummary table: guessgrad.rules.GuessRule" in p
        for p in problems
    )


def test_public_modules_are_found_from_the_roots():
    assert set(coverage_check.public_modules()) == {
        "guessgrad",
        "guessgrad.data",
        "guessgrad.estimators",
        "guessgrad.experiment",
        "guessgrad.metrics",
        "guessgrad.models",
        "guessgrad.parallel",
        "guessgrad.rules",
    }


# --- code blocks ------------------------------------------------------------------

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$"
)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, source)`` of every fenced block whose language is ``python``.

    ``line`` is the 1-based line of the block's first source line.
    """
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        i += 1
        if not match:
            continue
        indent, fence = match["indent"], match["fence"]
        start, body = i, []
        while i < len(lines):
            close = _FENCE.match(lines[i])
            if (
                close
                and close["fence"][0] == fence[0]
                and len(close["fence"]) >= len(fence)
                and not close["info"].strip()
            ):
                break
            body.append(lines[i].removeprefix(indent))
            i += 1
        i += 1
        if match["info"].strip() == "python":
            blocks.append((start + 1, "\n".join(body) + "\n"))
    return blocks


def few_steps(source: str) -> str:
    """``range(N)`` with N > 3 becomes ``range(3)``."""
    return re.sub(r"\brange\((\d+)\)", lambda m: f"range({min(int(m[1]), 3)})", source)


def _markdown_files():
    """README.md (fast) and each page of docs/ (slow) with python blocks."""
    files = [ROOT / "README.md"]
    files += sorted(
        p
        for p in DOCS.rglob("*.md")
        if not any(part.startswith(("_", ".")) for part in p.relative_to(DOCS).parts)
    )
    return [
        pytest.param(
            path,
            id=str(path.relative_to(ROOT)),
            marks=() if path.name == "README.md" else pytest.mark.slow,
        )
        for path in files
        if python_blocks(path.read_text(encoding="utf-8"))
    ]


def test_python_blocks_are_found():
    text = (
        "```python\na = 1\n```\n\n"
        "```bash\nrm -rf /\n```\n\n"
        "- a list item:\n\n  ```python\n  b = a + 1\n  ```\n\n"
        "````text\n```python\nnot = run\n```\n````\n"
        "```{code-block} python\nc = 3\n```\n"
    )
    assert python_blocks(text) == [(2, "a = 1\n"), (12, "b = a + 1\n")]
    assert few_steps("for t in range(500):\nrange(2)\nrange(n)") == (
        "for t in range(3):\nrange(2)\nrange(n)"
    )


@pytest.mark.parametrize("path", _markdown_files())
def test_code_blocks_run(path, tmp_path, monkeypatch):
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GUESSGRAD_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = {"__name__": "__main__"}
    for line, source in blocks:
        # Padded so that a traceback names the Markdown file and its line.
        code = compile("\n" * (line - 1) + few_steps(source), str(path), "exec")
        exec(code, namespace)  # noqa: S102


# --- the site -----------------------------------------------------------------------


@pytest.mark.slow
def test_docs_build(tmp_path):
    """``sphinx-build -W --keep-going -b html docs <out>``: no warnings, the coverage check included."""
    for module in ("sphinx", "myst_nb", "sphinx_book_theme"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f'{module} is not installed (pip install -e ".[docs]")')
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q"]
        + ["-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert (tmp_path / "html" / "api" / "estimators.html").exists()
    assert (tmp_path / "html" / "_notebooks" / "quickstart.html").exists()
