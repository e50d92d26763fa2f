"""A training run's lifecycle: prepare -> fit -> finalize (test once, calibrate, export into the
results folder) -> publish; checkpoints and torchrun's process group.

Imports nothing: each module is imported by name, so the slim app venv can read the serving path.
"""
