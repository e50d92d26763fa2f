"""What is served: the model contract (the ONNX graph's input and outputs), the one prediction
path (no torch), registered versions, the model cache, and the app's serving layer.

Imports nothing: each module is imported by name, so the slim app venv can read the serving path.
"""
