"""How far a model is trusted: calibration, the trust profile, evaluation, robustness under
corruptions, int8 quantization and run comparison (each a command on logged models).

Imports nothing: each module is imported by name, so the slim app venv can read the serving path.
"""
