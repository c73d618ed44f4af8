"""Image classification data: loading, normalisation and on-device batching.

``load("mnist10k")`` (the default) needs nothing but this package: 10,000
real MNIST digits ship inside it (see ``MNIST10K.md``). The other names are
tensorflow-datasets data sets, read from an array_record copy prepared once
with ``python -m experiments.prepare_data``. ``Loader`` keeps a whole split on
the accelerator and cuts the batch for any global step from ``(key, step)``
alone.
"""

from guessgrad._src.data import DATASETS as DATASETS
from guessgrad._src.data import DEFAULT_DATASET as DEFAULT_DATASET
from guessgrad._src.data import TRANSFORMS as TRANSFORMS
from guessgrad._src.data import DataMissingError as DataMissingError
from guessgrad._src.data import Dataset as Dataset
from guessgrad._src.data import Loader as Loader
from guessgrad._src.data import augment as augment
from guessgrad._src.data import default_data_dir as default_data_dir
from guessgrad._src.data import image_shape as image_shape
from guessgrad._src.data import load as load
from guessgrad._src.data import normalize as normalize
from guessgrad._src.data import num_classes as num_classes
from guessgrad._src.data import num_train_examples as num_train_examples
from guessgrad._src.data import transform as transform

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "TRANSFORMS",
    "DataMissingError",
    "Dataset",
    "Loader",
    "augment",
    "default_data_dir",
    "image_shape",
    "load",
    "normalize",
    "num_classes",
    "num_train_examples",
    "transform",
]
