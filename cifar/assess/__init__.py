"""Commands on logged and registered models: evaluation, refitting the calibration, robustness under
corruptions, int8 quantization and run comparison.

Imports nothing: each module is imported by name.
"""
