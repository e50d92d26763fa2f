"""Serving a registered model: the one prediction path (``inference``, no torch), the local model
cache, the ``predict`` command, occlusion maps and the app's serving layer.

Imports nothing: each module is imported by name, so the slim app venv can read the serving path.
"""
