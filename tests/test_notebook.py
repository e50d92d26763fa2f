"""The notebook walkthrough runs top to bottom on a small subset, into a temporary store."""

from __future__ import annotations

import json
import os

import pytest
from conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"


def test_notebook_is_committed_without_outputs():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    assert all(not c.get("outputs") and not c.get("execution_count") for c in cells if c["cell_type"] == "code")


def test_notebook_executes(tmp_path, prepared_dir, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("CIFAR_DATA", str(prepared_dir))
    monkeypatch.setenv("CIFAR_TENSORBOARD_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("WALKTHROUGH_SUBSET", "300")
    monkeypatch.setenv("WALKTHROUGH_EPOCHS", "1")
    monkeypatch.setenv("WALKTHROUGH_TRIALS", "2")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = json.dumps([o.get("text", "") for o in outputs])
    assert "val " in text and "test accuracy" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # samples, augmentation, training curves
