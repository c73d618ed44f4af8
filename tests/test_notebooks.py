"""The Colab notebooks (colab/*.ipynb) run end to end in smoke mode, and are committed without outputs.

Each notebook is executed with nbclient in a fresh ``python3`` kernel, with
``GUESSGRAD_SMOKE=1`` (tiny settings on the embedded digits, no internet, no
install) and a temporary working directory. The kernel must run this
interpreter: a ``python3`` kernelspec whose command is ``python`` runs
``sys.executable`` (jupyter_client's rule), and the first cell executed
checks it.
"""

import ast
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

COLAB = pathlib.Path(__file__).resolve().parent.parent / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
# Smoke runs over ~30 s on 2 CPU cores (every estimator compiled at least twice).
SLOW = {"your_model.ipynb"}
CELL_TIMEOUT_S = 300

# Run before the notebook's own cells (in memory only): the kernel must be this Python.
_KERNEL_CHECK = f"""
import sys
assert sys.executable == {sys.executable!r} or sys.prefix == {sys.prefix!r}, (
    f"the python3 kernel runs {{sys.executable}}, not {sys.executable}: register this "
    "interpreter's kernel with `python -m ipykernel install --sys-prefix` or remove the "
    "other python3 kernelspec"
)
"""


# Each is run below; a missing one fails here instead of being skipped unseen.
EXPECTED = {
    "localmixer.ipynb",
    "nnx.ipynb",
    "prompt_tuning.ipynb",
    "quickstart.ipynb",
    "your_model.ipynb",
}


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {COLAB}"
    missing = EXPECTED - {p.name for p in NOTEBOOKS}
    assert not missing, f"{sorted(missing)} not in {COLAB}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    stored = [
        i
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code"
        and (cell.outputs or cell.execution_count is not None)
    ]
    assert not stored, (
        f"{path.name}: cells {stored} hold outputs or execution counts; clear them "
        "(e.g. jupyter nbconvert --clear-output --inplace) so diffs stay readable"
    )


# Not installed with the package: a notebook on Colab has no clone of the repository.
_REPOSITORY_ONLY = {"experiments", "tests"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_imports_only_the_installed_package(path):
    notebook = nbformat.read(path, as_version=4)
    imported = []
    for i, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        # Shell and magic lines (!pip, %matplotlib) are no Python.
        source = "\n".join(
            "" if line.lstrip().startswith(("!", "%")) else line
            for line in cell.source.splitlines()
        )
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            imported += [
                (i, name) for name in names if name.split(".")[0] in _REPOSITORY_ONLY
            ]
    assert not imported, (
        f"{path.name} imports {imported} (cell, module): only the repository has them; "
        "use guessgrad.experiment, which the package installs"
    )


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW else p
        for p in NOTEBOOKS
    ],
    ids=lambda p: p.name,
)
@pytest.mark.slow
def test_runs_in_smoke_mode(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(_KERNEL_CHECK))
    env = dict(os.environ, GUESSGRAD_SMOKE="1")
    # XLA_FLAGS comes from conftest: the kernel compiles as the tests do.
    # The notebook imports the guessgrad of this checkout, wherever it runs.
    root = str(pathlib.Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as err:
        # Its message holds the failing cell's source and traceback.
        pytest.fail(f"{path.name}: a cell failed:\n{err}", pytrace=False)
    except (
        nbclient.exceptions.CellTimeoutError,
        nbclient.exceptions.DeadKernelError,
    ) as err:
        pytest.fail(f"{path.name}: {type(err).__name__}: {err}", pytrace=False)
