"""guessgrad: training neural networks with guessed gradients.

The top level holds what another project needs: marking sites in a model
(:func:`site`, :func:`tap`, :func:`mark_outputs`, :func:`copies`), the
estimators (:mod:`guessgrad.estimators`, by name with :func:`get_estimator`),
guess rules (:mod:`guessgrad.rules`), a training step, and what the engine
sees of a model (its structure, site values, exact site gradients).
"""

from guessgrad._src import cpu_flags as _cpu_flags

_cpu_flags.apply()  # before anything below can start JAX's backend

from guessgrad import data as data
from guessgrad import estimators as estimators
from guessgrad import metrics as metrics
from guessgrad import models as models
from guessgrad import parallel as parallel
from guessgrad import rules as rules
from guessgrad._src.base import Estimator as Estimator
from guessgrad._src.base import is_stateful as is_stateful
from guessgrad._src.estimators import DEFAULT_MODE as DEFAULT_MODE
from guessgrad._src.estimators import ESTIMATORS as ESTIMATORS
from guessgrad._src.estimators import MODES as MODES
from guessgrad._src.estimators import build_estimator as build_estimator
from guessgrad._src.estimators import directional_derivatives as directional_derivatives
from guessgrad._src.estimators import estimator_options as estimator_options
from guessgrad._src.estimators import get_estimator as get_estimator
from guessgrad._src.estimators import guess_context as guess_context
from guessgrad._src.estimators import print_structure as print_structure
from guessgrad._src.estimators import site_gradients as site_gradients
from guessgrad._src.estimators import site_guesses as site_guesses
from guessgrad._src.estimators import site_values as site_values
from guessgrad._src.estimators import structure as structure
from guessgrad._src.losses import check_labels as check_labels
from guessgrad._src.losses import per_example_loss as per_example_loss
from guessgrad._src.optim import stable_adamw as stable_adamw
from guessgrad._src.problem import model_rngs as model_rngs
from guessgrad._src.rules import GuessContext as GuessContext
from guessgrad._src.rules import GuessRule as GuessRule
from guessgrad._src.sites import NEXT as NEXT
from guessgrad._src.sites import Copies as Copies
from guessgrad._src.sites import SiteInfo as SiteInfo
from guessgrad._src.sites import Structure as Structure
from guessgrad._src.sites import copies as copies
from guessgrad._src.sites import mark_outputs as mark_outputs
from guessgrad._src.sites import site as site
from guessgrad._src.sites import tap as tap
from guessgrad._src.train import TrainState as TrainState
from guessgrad._src.train import init_train_state as init_train_state
from guessgrad._src.train import make_train_step as make_train_step

__version__ = "0.2.0"

__all__ = (
    "DEFAULT_MODE",
    "ESTIMATORS",
    "MODES",
    "NEXT",
    "Copies",
    "Estimator",
    "GuessContext",
    "GuessRule",
    "SiteInfo",
    "Structure",
    "TrainState",
    "build_estimator",
    "check_labels",
    "copies",
    "data",
    "directional_derivatives",
    "estimator_options",
    "estimators",
    "get_estimator",
    "guess_context",
    "init_train_state",
    "is_stateful",
    "make_train_step",
    "mark_outputs",
    "metrics",
    "model_rngs",
    "models",
    "parallel",
    "per_example_loss",
    "print_structure",
    "rules",
    "site",
    "site_gradients",
    "site_guesses",
    "site_values",
    "stable_adamw",
    "structure",
    "tap",
)
