"""The served model's contract, what every layer above agrees on: the graph's input and outputs
(``schema``), decoding a user's image (``images``), the registered model's name, aliases and tags
(``registered_model``) and the trust record a model carries (``trust``).

Imports nothing: the slim app venv (no torch) reads these modules by name.
"""
