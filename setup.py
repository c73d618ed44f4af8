"""guessgrad: training neural networks with guessed gradients in JAX."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent

# The documentation site (docs/conf.py): sphinx-build -W -b html docs docs/_build/html.
_DOCS = ["sphinx>=7.2", "myst-nb>=1.1", "sphinx-book-theme>=1.1"]

setuptools.setup(
    name="guessgrad",
    version="0.2.0",
    description=(
        "Gradient estimates from forward-mode directional derivatives and "
        "structured guesses of the gradient's direction, in JAX."
    ),
    long_description=(_HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["guessgrad", "guessgrad.*"]),
    package_data={"guessgrad": ["py.typed"], "guessgrad.data": ["*.npz", "*.md"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.11",  # NNX: nnx.to_pure_dict, nnx.Optimizer(wrt=...)
        "optax>=0.2",
        "chex>=0.1.86",
        "numpy>=1.24",
    ],
    extras_require={
        # Everything `python -m experiments.*` and `python -m benchmarks.*` use.
        "experiments": [
            "absl-py>=1.4",
            # Experiments as config files (experiments/configs/*.py, --config).
            "ml_collections>=0.1.1",
            "tensorflow-datasets>=4.9.4",
            "array_record>=0.5",
            "orbax-checkpoint>=0.5",
            "tqdm>=4.60",
            "matplotlib>=3.7",
            # tfds decodes images with PIL and, to prepare a data set, needs
            # importlib_resources on every Python version.
            "pillow>=9",
            "importlib_resources>=5",
        ],
        # nbclient, nbformat, ipykernel: tests/test_notebooks.py runs colab/*.ipynb;
        # the docs' packages: tests/test_docs.py builds the site.
        "test": [
            "pytest>=7.4",
            "pytest-xdist>=3.5",
            "nbclient>=0.10",
            "nbformat>=5.9",
            "ipykernel>=6.25",
            *_DOCS,
        ],
        "docs": _DOCS,
        "dev": ["ruff>=0.5"],
    },
)
