"""The app's own environment (streamlit_app/requirements.txt): small enough to host, and no torch."""

from __future__ import annotations

import subprocess
import tarfile
import venv
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MAX_INSTALLED_MB, MAX_PACKED_MB = 850, 300


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def test_slim_app_environment(tmp_path):
    """The slim venv installs small, without torch, and serves the registry's production model as the app does."""
    env_dir = tmp_path / "slim"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-compile",
            "-r",
            str(ROOT / "streamlit_app" / "requirements.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    installed_mb = folder_bytes(site) / 1e6
    packed = tmp_path / "slug.tar.gz"
    with tarfile.open(packed, "w:gz", compresslevel=6) as tar:
        tar.add(site, arcname="site-packages")
    packed_mb = packed.stat().st_size / 1e6
    print(f"slim app environment: {installed_mb:.0f} MB installed, {packed_mb:.0f} MB packed")
    assert not (site / "torch").exists()
    assert installed_mb < MAX_INSTALLED_MB and packed_mb < MAX_PACKED_MB, (installed_mb, packed_mb)
    # The app's path works there: models:/cifar10-classifier@production from a SQLite store, through
    # cifar.serve.serving (which version is production) and its Predictor, without torch.
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CIFAR_MODEL_CACHE": str(tmp_path / "cache")}
    assert run_cli([str(ROOT / "register.py"), "--import-bundled"], env=env, cwd=tmp_path).returncode == 0
    code = (
        "import sys; from cifar.serve import serving; import streamlit;"
        "info = serving.production_model(); p = serving.Predictor.from_uri(info.uri);"
        f"r = p.predict_files([{str(ROOT / 'streamlit_app' / 'samples' / 'ship_0.png')!r}])[0];"
        "assert r.label == 'ship' and r.in_distribution, r; assert 'torch' not in sys.modules, 'torch imported';"
        "print('ok', info.version, r.label, round(r.confidence, 4))"
    )
    check = subprocess.run(
        [str(python), "-c", code],
        cwd=tmp_path,
        env={"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0 and "ok 1 ship" in check.stdout, check.stdout + check.stderr[-3000:]
