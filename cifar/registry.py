"""The MLflow model registry: choose the best run on validation, register, promote, roll back.

Promotion is champion/challenger: the alias ``production`` (MLflow 3's convention; the app
loads ``models:/cifar10-classifier@production``) moves only when the challenger beats the
champion on the validation metric. The legacy stage "Production" follows the alias, so older
clients agree. The test split is evaluated for the record, never used to choose.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifar.errors import CifarError

MODEL_NAME = "cifar10-classifier"
PRODUCTION, PREVIOUS = "production", "previous"
METRIC_ALIASES = {"val_accuracy": "best_val_accuracy"}


def _client():
    import mlflow

    return mlflow.MlflowClient()


@dataclass(frozen=True)
class Candidate:
    run_id: str
    model_uri: str
    metric: str
    value: float
    run_test_accuracy: float | None
    experiment: str
    study: str
    git_commit: str
    data_digest: str


def find_best_run(
    experiments: list[str] | None = None, study: str | None = None, metric: str = "val_accuracy"
) -> Candidate:
    """The FINISHED run with a logged model and the highest validation ``metric``."""
    client = _client()
    key = METRIC_ALIASES.get(metric, metric)
    if key.startswith("test"):
        raise CifarError(f"--metric {metric}: runs are chosen on validation, never on the test split.")
    names = experiments or []
    if names:
        found = [client.get_experiment_by_name(n) for n in names]
        missing = [n for n, e in zip(names, found) if e is None]
        if missing:
            raise CifarError(f"no MLflow experiment named {', '.join(missing)} in {_tracking_uri()}.")
        ids = [e.experiment_id for e in found]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    query = "attributes.status = 'FINISHED' and tags.model_uri != ''"
    if study:
        query += f" and tags.optuna_study = '{study}' and tags.trial_state = 'COMPLETE'"
    runs = client.search_runs(ids, query, order_by=[f"metrics.{key} DESC"], max_results=50) if ids else []
    runs = [r for r in runs if key in r.data.metrics and r.data.tags.get("model_uri")]
    if not runs:
        scope = f"study '{study}'" if study else f"experiment(s) {', '.join(names)}" if names else "any experiment"
        raise CifarError(
            f"no finished run with a logged model and metric '{key}' in {scope} ({_tracking_uri()}). "
            "Train one first: python train.py (or python tune.py)."
        )
    best = runs[0]
    tags = best.data.tags
    experiment = client.get_experiment(best.info.experiment_id).name
    return Candidate(
        best.info.run_id,
        tags["model_uri"],
        key,
        best.data.metrics[key],
        best.data.metrics.get("test_accuracy"),
        experiment,
        tags.get("optuna_study", ""),
        tags.get("git_commit", "unknown"),
        tags.get("data_digest", "unknown"),
    )


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def score_on_test_split(model_uri: str, data_dir: Path | None = None) -> tuple[float, str]:
    """Re-evaluate a logged model on the local cache's test split (accuracy, data digest)."""
    import mlflow

    from cifar.data import ensure_cache

    data = ensure_cache(data_dir)
    model = mlflow.pyfunc.load_model(model_uri)
    images, labels = data.images["test"], data.labels["test"]
    correct = 0
    for start in range(0, len(labels), 1000):
        batch = np.asarray(images[start : start + 1000]).transpose(0, 3, 1, 2).astype(np.float32) / 255
        logits = model.predict({"image": batch})["logits"]
        correct += int((logits.argmax(1) == labels[start : start + 1000]).sum())
    return correct / len(labels), data.digest


def production_version(name: str = MODEL_NAME):
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_model_version_by_alias(name, PRODUCTION)
    except MlflowException:
        return None


def registry_lock():
    """Serialise promotions on a local SQLite store."""
    from cifar.locks import sqlite_lock

    return sqlite_lock(_tracking_uri(), "register")


def _sync_stage(name: str) -> None:
    """Make the legacy stage follow the alias: the production version is the one 'Production'."""
    version = production_version(name)
    if version is None:
        return
    client = _client()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # Archive the others one by one: MLflow 3.17's archive_existing_versions=True compares an
        # integer column with text and fails on a PostgreSQL backend store.
        for other in client.search_model_versions(f"name = '{name}'"):
            if other.version != version.version and other.current_stage == "Production":
                client.transition_model_version_stage(name, other.version, "Archived")
        if version.current_stage != "Production":
            client.transition_model_version_stage(name, version.version, "Production")


def _version_for_run(name: str, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        versions = _client().search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        return None
    return versions[0] if versions else None


@dataclass
class Decision:
    candidate: Candidate
    champion: object | None
    champion_value: float | None
    promote: bool
    reason: str
    version: str | None = None
    test_accuracy: float | None = None


def decide(candidate: Candidate, name: str, min_improvement: float, force: bool) -> Decision:
    champion = production_version(name)
    champion_value = float(champion.tags["val_accuracy"]) if champion and "val_accuracy" in champion.tags else None
    if champion is not None and champion.run_id == candidate.run_id:
        return Decision(candidate, champion, champion_value, False, "the candidate already is production")
    if force:
        return Decision(candidate, champion, champion_value, True, "--force")
    if champion is None:
        return Decision(candidate, None, None, True, "no production version yet")
    if champion_value is None or candidate.value > champion_value + min_improvement:
        return Decision(
            candidate,
            champion,
            champion_value,
            True,
            f"beats production by more than {min_improvement:g} on validation",
        )
    return Decision(
        candidate,
        champion,
        champion_value,
        False,
        f"does not beat production ({champion_value:.4f}) by more than {min_improvement:g}",
    )


def register_and_promote(decision: Decision, name: str, data_dir: Path | None = None) -> Decision:
    """Register the candidate (once per run) and, if decided, move ``production`` to it."""
    import mlflow

    c = decision.candidate
    test_accuracy, digest = score_on_test_split(c.model_uri, data_dir)  # before any write: no half-written registry
    decision.test_accuracy = test_accuracy
    client = _client()
    with registry_lock():
        existing = _version_for_run(name, c.run_id)
        if existing is None:
            tags = {
                "run_id": c.run_id,
                "val_accuracy": f"{c.value:.6f}",
                "test_accuracy": f"{test_accuracy:.6f}",
                "run_test_accuracy": f"{c.run_test_accuracy:.6f}" if c.run_test_accuracy is not None else "",
                "git_commit": c.git_commit,
                "data_digest": c.data_digest,
                "test_data_digest": digest,
                "experiment": c.experiment,
                "study": c.study,
                "selection_metric": c.metric,
                "source": "training run",
            }
            version = mlflow.register_model(c.model_uri, name, tags=tags)
            client.update_model_version(
                name,
                version.version,
                description=(
                    f"Run {c.run_id} ({c.experiment}{', study ' + c.study if c.study else ''}): "
                    f"{c.metric} {c.value:.4f}, test accuracy {test_accuracy:.4f} (re-evaluated at registration)."
                ),
            )
            decision.version = str(version.version)
        else:
            decision.version = str(existing.version)
        if decision.promote:
            current = production_version(name)
            if current is not None and current.version != decision.version:
                client.set_registered_model_alias(name, PREVIOUS, current.version)
            client.set_registered_model_alias(name, PRODUCTION, decision.version)
        _sync_stage(name)
    return decision


def rollback(name: str = MODEL_NAME) -> tuple[str, str]:
    """Move ``production`` back to ``previous`` (and ``previous`` to the version rolled back)."""
    from mlflow.exceptions import MlflowException

    client = _client()
    with registry_lock():
        current = production_version(name)
        try:
            previous = client.get_model_version_by_alias(name, PREVIOUS)
        except MlflowException:
            previous = None
        if current is None or previous is None:
            raise CifarError(
                f"nothing to roll back to: '{name}' has no '{PREVIOUS}' alias (see python register.py --list)."
            )
        client.set_registered_model_alias(name, PRODUCTION, previous.version)
        client.set_registered_model_alias(name, PREVIOUS, current.version)
        _sync_stage(name)
    return current.version, previous.version


def list_versions(name: str = MODEL_NAME) -> list[dict]:
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        versions = client.search_model_versions(f"name='{name}'", order_by=["version_number DESC"])
    except MlflowException:
        return []
    aliases: dict[str, list[str]] = {}
    with contextlib.suppress(MlflowException):
        for alias, version in client.get_registered_model(name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
    return [
        {
            "version": v.version,
            "aliases": ",".join(sorted(aliases.get(str(v.version), []))) or "-",
            "stage": v.current_stage,
            "val_accuracy": v.tags.get("val_accuracy", "-"),
            "test_accuracy": v.tags.get("test_accuracy", "-"),
            "source": v.tags.get("source", "-"),
            "run_id": v.run_id or "-",
        }
        for v in versions
    ]


def import_bundled(bundle_dir: Path | None = None, name: str = MODEL_NAME) -> tuple[str, bool]:
    """Register the repository's bundled model (once) and make it production if there is none.

    Its run (experiment ``bundled-model``) carries the accuracy measured when it was built.
    Returns (version, whether it is production now).
    """
    import json

    import mlflow
    import onnx
    import yaml

    from cifar.bundle import BUNDLE_DIR
    from cifar.tracking import log_onnx_model

    folder = Path(bundle_dir or BUNDLE_DIR)
    if not (folder / "MLmodel").is_file():
        raise CifarError(f"no bundled model in {folder} (expected an MLflow model folder with MLmodel).")
    metrics = json.loads((folder / "metrics.json").read_text())
    metadata = (yaml.safe_load((folder / "MLmodel").read_text()) or {}).get("metadata") or {}
    client = _client()
    with registry_lock():
        existing = client.search_model_versions(f"name='{name}' and tags.source='bundled'") if _has_model(name) else []
        if existing:
            version = existing[0].version
        else:
            proto = onnx.load(str(folder / "model.onnx"))
            example = np.zeros((1, 3, 32, 32), np.float32)
            mlflow.set_experiment("bundled-model")
            with mlflow.start_run(run_name="bundled-model") as run:
                mlflow.log_metrics(
                    {"best_val_accuracy": metrics["val_accuracy"], "test_accuracy": metrics["test_accuracy"]}
                )
                mlflow.log_artifact(str(folder / "README.md"), "bundle")
                for file, artifact_dir in (
                    ("per_class.csv", "evaluation"),
                    ("confusion_matrix.png", "evaluation"),
                    ("training_curves.png", "plots"),
                ):
                    if (folder / file).is_file():
                        mlflow.log_artifact(str(folder / file), artifact_dir)
                mlflow.log_dict(metrics, "bundle/metrics.json")
                uri = log_onnx_model(proto, metadata, example)
                mlflow.set_tags({"model_uri": uri, "source": "bundled", "data_digest": metrics["data_digest"]})
            tags = {
                "source": "bundled",
                "run_id": run.info.run_id,
                "val_accuracy": f"{metrics['val_accuracy']:.6f}",
                "test_accuracy": f"{metrics['test_accuracy']:.6f}",
                "data_digest": metrics["data_digest"],
                "experiment": "bundled-model",
                "study": "",
            }
            version = mlflow.register_model(uri, name, tags=tags).version
            client.update_model_version(
                name,
                version,
                description=(
                    "Bundled with the repository (models/bundled/README.md): "
                    f"test accuracy {metrics['test_accuracy']:.4f}."
                ),
            )
        promoted = False
        if production_version(name) is None:
            client.set_registered_model_alias(name, PRODUCTION, version)
            _sync_stage(name)
            promoted = True
    return str(version), promoted


def _has_model(name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        _client().get_registered_model(name)
        return True
    except MlflowException:
        return False
