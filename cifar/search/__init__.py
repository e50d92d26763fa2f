"""Hyperparameter search: an Optuna study whose trials are ordinary tracked training runs (``study``),
over a space that is data (``space``)."""

from cifar.search.space import Param, SearchSpace, load_space, space_path, suggest
from cifar.search.study import PARENT_ATTR, TuneOptions, make_sampler, run_search

__all__ = [
    "PARENT_ATTR",
    "Param",
    "SearchSpace",
    "TuneOptions",
    "load_space",
    "make_sampler",
    "run_search",
    "space_path",
    "suggest",
]
