"""A training run's lifecycle: prepare -> fit -> finalize (test once, calibrate, export the served
graph into the results folder) -> publish.

Imports nothing: each module is imported by name.
"""
