"""Data: sources -> decoded cache with a validation split -> device-resident loader.

``cifar.data.loader`` needs torch and is imported on its own; this package imports only NumPy.
"""

from cifar.data.cache import (
    CifarData,
    default_data_dir,
    default_source,
    ensure_cache,
    load_cache,
    prepare_cache,
    stratified_split,
)
from cifar.data.sources import CIFAR10_CLASSES

__all__ = [
    "CIFAR10_CLASSES",
    "CifarData",
    "default_data_dir",
    "default_source",
    "ensure_cache",
    "load_cache",
    "prepare_cache",
    "stratified_split",
]
