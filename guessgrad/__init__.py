"""guessgrad: training neural networks with guessed gradients."""

from guessgrad import metrics as metrics
from guessgrad import models as models
from guessgrad import parallel as parallel
from guessgrad._src.core import MODES as MODES
from guessgrad._src.core import check_labels as check_labels
from guessgrad._src.core import per_example_loss as per_example_loss
from guessgrad._src.estimators import DEFAULT_MODE as DEFAULT_MODE
from guessgrad._src.estimators import ESTIMATORS as ESTIMATORS
from guessgrad._src.estimators import build_estimator as build_estimator
from guessgrad._src.estimators import directional_derivatives as directional_derivatives
from guessgrad._src.estimators import estimator_options as estimator_options
from guessgrad._src.estimators import get_estimator as get_estimator
from guessgrad._src.estimators import model_rngs as model_rngs
from guessgrad._src.estimators import print_structure as print_structure
from guessgrad._src.estimators import structure as structure
from guessgrad._src.optim import OPTIMIZERS as OPTIMIZERS
from guessgrad._src.optim import make_optimizer as make_optimizer
from guessgrad._src.optim import stable_adamw as stable_adamw
from guessgrad._src.sites import NEXT as NEXT
from guessgrad._src.sites import Copies as Copies
from guessgrad._src.sites import MarkedModel as MarkedModel
from guessgrad._src.sites import SiteInfo as SiteInfo
from guessgrad._src.sites import Structure as Structure
from guessgrad._src.sites import copies as copies
from guessgrad._src.sites import mark_outputs as mark_outputs
from guessgrad._src.sites import site as site
from guessgrad._src.sites import tap as tap
from guessgrad._src.train import TrainState as TrainState
from guessgrad._src.train import init_train_state as init_train_state
from guessgrad._src.train import make_train_step as make_train_step

__version__ = "0.1.0"

__all__ = (
    "DEFAULT_MODE",
    "ESTIMATORS",
    "MODES",
    "NEXT",
    "OPTIMIZERS",
    "Copies",
    "MarkedModel",
    "SiteInfo",
    "Structure",
    "TrainState",
    "build_estimator",
    "check_labels",
    "copies",
    "directional_derivatives",
    "estimator_options",
    "get_estimator",
    "init_train_state",
    "make_optimizer",
    "make_train_step",
    "mark_outputs",
    "model_rngs",
    "models",
    "parallel",
    "per_example_loss",
    "print_structure",
    "site",
    "stable_adamw",
    "structure",
    "tap",
)
