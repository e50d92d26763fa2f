"""cifar: train, search, track and serve CIFAR-10 classifiers with PyTorch and MLflow.

Imports nothing heavy, so the slim app environment (no torch) can import ``cifar.serve.inference``.
"""

__version__ = "0.1.0"
