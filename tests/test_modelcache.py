"""cifar.serve.modelcache: a registry model is copied once and reused only while the SQLite store is unchanged."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3

import pytest
from conftest import ROOT, relabelled, run_cli

from cifar.data.sources import CIFAR10_CLASSES
from cifar.serve import modelcache
from cifar.settings import load_settings

IMAGE = ROOT / "tests/fixtures/cifar10-mini/test/ship"
NAME = "cifar10-classifier"


def predict(env: dict, cwd) -> tuple[list[dict], bool]:
    """The JSON answer for the fixture's ship images, and whether the call imported mlflow."""
    result = run_cli(["-X", "importtime", "-m", "cifar.serve.predict", str(IMAGE), "--json"], env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = any(line.rsplit("|", 1)[-1].strip() == "mlflow" for line in result.stderr.splitlines())
    return json.loads(result.stdout), imported


@pytest.fixture
def registered(tmp_path):
    """A private SQLite registry whose production alias is the bundled model (version 1)."""
    cache = tmp_path / "cache"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CIFAR_MODEL_CACHE": str(cache)}
    done = run_cli([str(ROOT / "register.py"), "--import-bundled"], env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return env, cache


def move_production_to_a_new_version(env: dict) -> str:
    """Production moves to the bundled network with its label table rotated by one (``conftest.relabelled``)."""
    import mlflow
    import onnx
    from mlflow.models import Model

    from cifar.promote.bundle import BUNDLE_DIR
    from cifar.tracking import log_onnx_model

    outer = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        client = mlflow.MlflowClient()
        first = client.get_model_version_by_alias(NAME, "production")
        bundled = Model.load(str(BUNDLE_DIR))
        proto, meta = relabelled(onnx.load(str(BUNDLE_DIR / "model.onnx")), bundled.metadata)
        with mlflow.start_run(experiment_id=client.get_run(first.run_id).info.experiment_id) as run:
            uri = log_onnx_model(proto, meta, bundled.load_input_example(str(BUNDLE_DIR))["image"])
        second = client.create_model_version(NAME, uri, run_id=run.info.run_id)
        client.set_registered_model_alias(NAME, "production", second.version)
        return str(second.version)
    finally:
        mlflow.set_tracking_uri(outer)  # None also unsets the variable: a caller's own store stays theirs


def rotated(label: str) -> str:
    classes = list(CIFAR10_CLASSES)
    return classes[(classes.index(label) + 1) % len(classes)]


def test_second_call_skips_mlflow_until_the_alias_moves(registered, tmp_path):
    env, cache = registered
    cold, cold_imported = predict(env, tmp_path)
    warm, warm_imported = predict(env, tmp_path)
    assert cold_imported and not warm_imported, "the unchanged store should be read from the local copy"
    assert [r["label"] for r in warm] == [r["label"] for r in cold] and len(cold) == 20
    assert sum(r["label"] == "ship" for r in warm) >= 16
    assert {r["model"] for r in cold} == {f"models:/{NAME}@production (version 1)"}
    assert len(list(cache.glob("*.json"))) == 1

    version = move_production_to_a_new_version(env)
    moved, moved_imported = predict(env, tmp_path)
    assert moved_imported and {r["model"] for r in moved} == {f"models:/{NAME}@production (version {version})"}
    assert [r["label"] for r in moved] == [rotated(r["label"]) for r in cold]  # version 2's own answers
    again, again_imported = predict(env, tmp_path)
    assert not again_imported and again[0]["model"] == moved[0]["model"]


@pytest.mark.integration
def test_a_long_lived_process_follows_the_alias(registered, monkeypatch):
    """One process (an API worker, a notebook) asks for production again after a promotion: version 2 answers."""
    import mlflow

    from cifar.serve.inference import Predictor

    env, _ = registered
    mlflow.set_tracking_uri(None)  # follow the environment, as a fresh process would (this unsets the variable)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    images = sorted(IMAGE.glob("*.jpg"))[:5]
    before = [r.label for r in Predictor.from_uri(f"models:/{NAME}@production").predict_files(images)]
    version = move_production_to_a_new_version(env)
    after = Predictor.from_uri(f"models:/{NAME}@production")
    assert after.description.endswith(f"(version {version})")
    assert [r.label for r in after.predict_files(images)] == [rotated(label) for label in before]


@pytest.mark.integration
def test_off_always_asks_the_registry_and_a_removed_store_is_not_served_from_the_copy(registered, tmp_path):
    env, cache = registered
    off = {**env, "CIFAR_MODEL_CACHE": "off"}
    assert predict(off, tmp_path)[1] and predict(off, tmp_path)[1]
    assert not cache.exists()

    predict(env, tmp_path)  # fills the cache
    (tmp_path / "mlflow.db").unlink()
    gone = run_cli(["-m", "cifar.serve.predict", str(IMAGE)], env=env, cwd=tmp_path)
    assert gone.returncode == 2 and "python register.py" in gone.stderr and "Traceback" not in gone.stderr


def test_fingerprint_follows_every_write_and_only_sqlite_is_cached(tmp_path, monkeypatch):
    db = tmp_path / "store.db"
    uri = f"sqlite:///{db}"
    with sqlite3.connect(db) as connection:
        connection.execute("create table t (x)")
    before = modelcache.store_state(uri, uri)
    assert before == modelcache.store_state(uri, uri)
    with sqlite3.connect(db) as connection:
        connection.execute("insert into t values (1)")
    assert modelcache.store_state(uri, uri) != before
    inode, size, mtime = (lambda s: (s.st_ino, s.st_size, s.st_mtime_ns))(db.stat())
    before = modelcache.store_state(uri, uri)
    with sqlite3.connect(db) as connection:  # a same-size write...
        connection.execute("update t set x = 2")
    os.utime(db, ns=(mtime, mtime))  # ...within the same clock tick as the last one
    assert (db.stat().st_ino, db.stat().st_size) == (inode, size)
    assert modelcache.store_state(uri, uri) != before
    for other in ("http://127.0.0.1:5000", "postgresql://u@127.0.0.1/mlflow", "databricks"):
        assert modelcache.store_state(other, other) is None
        assert modelcache.store_state(uri, other) is None

    monkeypatch.setenv("CIFAR_MODEL_CACHE", str(tmp_path / "cache"))
    load_settings()
    assert modelcache.cached_copy("runs:/0123/model") is None  # a run's artifacts can change without a write
    monkeypatch.setenv("CIFAR_MODEL_CACHE", "off")
    load_settings()
    assert modelcache.cache_root() is None


@pytest.mark.integration
def test_a_failed_download_leaves_no_half_copy(registered, tmp_path):
    env, cache = registered
    artifacts = {p.parent for p in (tmp_path / "mlruns").rglob("model.onnx")}
    assert artifacts, "the registered model's files are in the local artifact store"
    for folder in artifacts:
        shutil.rmtree(folder)
    failed = run_cli(["-m", "cifar.serve.predict", str(IMAGE)], env=env, cwd=tmp_path)
    assert failed.returncode == 2 and "cannot load model" in failed.stderr and "Traceback" not in failed.stderr
    assert not list(cache.glob("*")), "a partial copy or an entry for it was left in the cache"


@pytest.mark.integration
def test_a_damaged_copy_is_fetched_again_and_predicts_as_before(registered, tmp_path):
    env, cache = registered
    cold, _ = predict(env, tmp_path)
    (copy,) = cache.rglob("model.onnx")
    raw = bytearray(copy.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 4096] = bytes(b ^ 0xFF for b in raw[middle : middle + 4096])  # 4 KiB of weights
    copy.write_bytes(bytes(raw))

    refetched, imported = predict(env, tmp_path)
    assert imported, "the damaged copy was used instead of being fetched again"
    assert refetched == cold and sum(r["label"] == "ship" for r in refetched) >= 16
    (entry,) = cache.glob("*.json")
    fresh = cache / json.loads(entry.read_text())["path"]
    assert fresh != copy.parent and modelcache.files_digest(fresh) == json.loads(entry.read_text())["sha256"]
    assert predict(env, tmp_path) == (cold, False), "the fresh copy is trusted again"
