"""The MLflow model registry: choose the best run on validation, register, promote, roll back.

Promotion is champion/challenger: the alias ``production`` (MLflow 3's convention; the app
loads ``models:/cifar10-classifier@production``) moves only when the challenger beats the
champion on the validation metric, and when it meets the trust minimums asked for (calibration
error, out-of-distribution AUROC). The legacy stage "Production" follows the alias, so older
clients agree. The test split is evaluated for the record, never used to choose.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
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
    trust: dict[str, float] = field(default_factory=dict)  # the run's calibration and OOD metrics
    ood_not_measured: tuple[str, ...] = ()  # OOD sets the run could not measure (tag ood_not_measured)

    @property
    def ece(self) -> float | None:
        return self.trust.get("test_ece_calibrated")

    @property
    def ood_auroc(self) -> float | None:
        """The lowest OOD AUROC over the sets the run measured (``ood_basis`` names them)."""
        from cifar.trust import headline_ood_auroc

        return headline_ood_auroc(self.trust)

    @property
    def ood_basis(self) -> str:
        """Which OOD sets ``ood_auroc`` stands on, and which were not measured."""
        from cifar.trust import ood_auroc_sets

        text = ", ".join(f"{name} {value:.4f}" for name, value in ood_auroc_sets(self.trust).items()) or "no set"
        return text + (f"; not measured: {', '.join(self.ood_not_measured)}" if self.ood_not_measured else "")


def _trust_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The calibration and OOD metrics of a run, under their code names (old or new run layout)."""
    from cifar.tracking.names import code_names

    named = code_names(metrics)
    return {k: v for k, v in named.items() if k in ("test_ece_calibrated", "temperature") or k.startswith("ood_")}


def find_best_run(
    experiments: list[str] | None = None, study: str | None = None, metric: str = "val_accuracy"
) -> Candidate:
    """The FINISHED run with a logged model and the highest validation ``metric``.

    Models whose metrics are linked to them (runs since 2026-12-02) are ranked by
    ``mlflow.search_logged_models``; runs of the older layout, whose metrics sit on the run only,
    by ``search_runs`` on the old name. The higher of the two leaders wins.
    """
    from cifar.tracking.names import metric_key

    client = _client()
    name = METRIC_ALIASES.get(metric, metric)
    key = metric_key(name)
    if key.startswith("test") or name.startswith("test"):
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
    leaders = [r for r in (_leader_by_model(ids, key, study), _leader_by_run(ids, name, study)) if r is not None]
    if not leaders:
        scope = f"study '{study}'" if study else f"experiment(s) {', '.join(names)}" if names else "any experiment"
        raise CifarError(
            f"no finished run with a logged model and metric '{key}' in {scope} ({_tracking_uri()}). "
            "Train one first: python train.py (or python tune.py)."
        )
    best, metric_name, value = max(leaders, key=lambda leader: leader[2])
    tags, metrics = best.data.tags, best.data.metrics
    experiment = client.get_experiment(best.info.experiment_id).name
    return Candidate(
        best.info.run_id,
        tags["model_uri"],
        metric_name,
        value,
        metrics.get(metric_key("test_accuracy"), metrics.get("test_accuracy")),
        experiment,
        tags.get("optuna_study", ""),
        tags.get("git_commit", "unknown"),
        tags.get("data_digest", "unknown"),
        _trust_metrics(metrics),
        tuple(filter(None, tags.get("ood_not_measured", "").split(","))),
    )


def _eligible(run, study: str | None) -> bool:
    tags = run.data.tags
    if run.info.status != "FINISHED" or not tags.get("model_uri"):
        return False
    return not study or (tags.get("optuna_study") == study and tags.get("trial_state") == "COMPLETE")


def _leader_by_model(ids: list[str], key: str, study: str | None):
    """(run, metric, value) of the best logged model by its linked ``key`` metric, or None."""
    import mlflow

    if not ids:
        return None
    models = mlflow.search_logged_models(
        experiment_ids=ids,
        filter_string=f"metrics.`{key}` > -1",
        order_by=[{"field_name": f"metrics.{key}", "ascending": False}],
        max_results=100,
        output_format="list",
    )
    client = _client()
    for model in models:
        if not model.source_run_id:
            continue
        run = client.get_run(model.source_run_id)
        if _eligible(run, study) and run.data.tags["model_uri"] == f"models:/{model.model_id}":
            value = max(m.value for m in model.metrics if m.key == key)
            return run, key, float(value)
    return None


def _leader_by_run(ids: list[str], name: str, study: str | None):
    """(run, metric, value) of the best run that logged ``name`` in the layout before metric sections, or None."""
    if not ids:
        return None
    query = "attributes.status = 'FINISHED' and tags.model_uri != ''"
    if study:
        query += f" and tags.optuna_study = '{study}' and tags.trial_state = 'COMPLETE'"
    runs = _client().search_runs(ids, query, order_by=[f"metrics.`{name}` DESC"], max_results=50)
    runs = [r for r in runs if name in r.data.metrics and _eligible(r, study)]
    return (runs[0], name, float(runs[0].data.metrics[name])) if runs else None


def has_trained_runs() -> bool:
    """Whether the store holds a finished training run with a logged model (the bundled model's run aside)."""
    client = _client()
    ids = [e.experiment_id for e in client.search_experiments() if e.name != "bundled-model"]
    query = "attributes.status = 'FINISHED' and tags.model_uri != ''"
    return bool(ids) and bool(client.search_runs(ids, query, max_results=1))


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


@dataclass(frozen=True)
class Assessment:
    """Measured at registration, for the record: never used to choose between runs."""

    test_accuracy: float
    test_data_digest: str
    mean_corruption_accuracy: float | None  # None: not measured (--robustness-images 0)


def assess_model(model_uri: str, data_dir: Path | None = None, robustness_images: int = 500) -> Assessment:
    """Re-evaluate a logged model through the serving path (ONNX Runtime): test split, corruptions."""
    from cifar.data import ensure_cache
    from cifar.inference import Predictor
    from cifar.robustness import corruption_table, mean_corruption_accuracy, sample_test_split

    data = ensure_cache(data_dir)
    predictor = Predictor.from_uri(model_uri)
    accuracy = float((predictor.predicted_classes(np.asarray(data.images["test"])) == data.labels["test"]).mean())
    corruption = None
    if robustness_images > 0:
        images, labels = sample_test_split(data, robustness_images)
        corruption = mean_corruption_accuracy(corruption_table(predictor.predicted_classes, images, labels))
    return Assessment(accuracy, data.digest, corruption)


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


def _version_for_run(name: str, run_id: str, precision: str = "float32"):
    from mlflow.exceptions import MlflowException

    try:
        versions = _client().search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        return None
    versions = [v for v in versions if v.tags.get("precision", "float32") == precision]
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
    refused: bool = False  # misses a required trust minimum: not even registered


def trust_shortfall(candidate: Candidate, max_ece: float | None, min_ood_auroc: float | None) -> str | None:
    """Why the candidate misses a required trust minimum, or None when it meets them all."""
    fix = f"measure it with: python -m cifar.calibrate --run-id {candidate.run_id}"
    if max_ece is not None:
        if candidate.ece is None:
            return f"the run has no calibration error (test_ece_calibrated) for --max-ece; {fix}"
        if candidate.ece > max_ece:
            return f"calibration error {candidate.ece:.4f} is above --max-ece {max_ece:g}"
    if min_ood_auroc is not None:
        if candidate.ood_auroc is None:
            return f"the run has no OOD AUROC for --min-ood-auroc; {fix}"
        if candidate.ood_auroc < min_ood_auroc:
            return (
                f"OOD AUROC {candidate.ood_auroc:.4f} is below --min-ood-auroc {min_ood_auroc:g} "
                f"(the lowest of {candidate.ood_basis})"
            )
    return None


def decide(
    candidate: Candidate,
    name: str,
    min_improvement: float,
    force: bool,
    max_ece: float | None = None,
    min_ood_auroc: float | None = None,
    precision: str = "float32",
) -> Decision:
    champion = production_version(name)
    champion_value = float(champion.tags["val_accuracy"]) if champion and "val_accuracy" in champion.tags else None
    if is_production(champion, candidate.run_id, precision):
        return Decision(candidate, champion, champion_value, False, "the candidate already is production")
    shortfall = trust_shortfall(candidate, max_ece, min_ood_auroc)
    if shortfall:  # an explicit minimum: --force does not override it
        return Decision(candidate, champion, champion_value, False, shortfall, refused=True)
    if force:
        return Decision(candidate, champion, champion_value, True, "--force")
    if champion is None:
        return Decision(candidate, None, None, True, "no production version yet")
    # Production's figure is stored at 6 decimals; compare at that precision, or a tie (a float32
    # mean such as 0.23000000417 against "0.230000") would promote.
    if champion_value is None or round(candidate.value, 6) > champion_value + min_improvement:
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


def is_production(champion, run_id: str, precision: str = "float32") -> bool:
    """Whether the production version is this run's model in this precision."""
    return champion is not None and champion.run_id == run_id and champion.tags.get("precision", "float32") == precision


def trust_tags(metrics: dict[str, float], corruption: float | None = None) -> dict[str, str]:
    """Version tags for what the registry shows about trust (``ood_auroc``: the lowest over ``ood_auroc_sets``)."""
    from cifar.trust import headline_ood_auroc, ood_auroc_sets

    values = {
        "test_ece": metrics.get("test_ece_calibrated"),
        "ood_auroc": headline_ood_auroc(metrics),
        "mean_corruption_accuracy": corruption,
        "temperature": metrics.get("temperature"),
    }
    tags = {k: f"{v:.6f}" for k, v in values.items() if v is not None}
    if ood_auroc_sets(metrics):
        tags["ood_auroc_sets"] = ",".join(ood_auroc_sets(metrics))
    return tags


def register_and_promote(
    decision: Decision,
    name: str,
    data_dir: Path | None = None,
    assessment: Assessment | None = None,
    extra_tags: dict[str, str] | None = None,
) -> Decision:
    """Register the candidate (once per run and precision) and, if decided, move ``production`` to it."""
    import mlflow

    c = decision.candidate
    if decision.refused:
        raise CifarError(f"run {c.run_id} was not registered: {decision.reason}.")
    # measured before any write: no half-written registry
    assessment = assessment or assess_model(c.model_uri, data_dir)
    test_accuracy, digest = assessment.test_accuracy, assessment.test_data_digest
    decision.test_accuracy = test_accuracy
    client = _client()
    with registry_lock():
        extra_tags = extra_tags or {}
        existing = _version_for_run(name, c.run_id, extra_tags.get("precision", "float32"))
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
                **trust_tags(c.trust, assessment.mean_corruption_accuracy),
                **extra_tags,
            }
            version = mlflow.register_model(c.model_uri, name, tags=tags)
            describe_registered_model(name)
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
            for key, value in trust_tags(c.trust, assessment.mean_corruption_accuracy).items():
                client.set_model_version_tag(name, existing.version, key, value)  # e.g. calibrated since
        if decision.promote:
            current = production_version(name)
            if current is not None and current.version != decision.version:
                client.set_registered_model_alias(name, PREVIOUS, current.version)
            client.set_registered_model_alias(name, PRODUCTION, decision.version)
        _sync_stage(name)
    return decision


def describe_registered_model(name: str = MODEL_NAME) -> None:
    """Give the registered model its description (what it is, its input and outputs) if it has none yet."""
    from cifar import contract
    from cifar.data.sources import CIFAR10_CLASSES

    client = _client()
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=contract.model_description(CIFAR10_CLASSES))


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
            "test_ece": v.tags.get("test_ece", "-"),
            "ood_auroc": v.tags.get("ood_auroc", "-"),
            "corruption_acc": v.tags.get("mean_corruption_accuracy", "-"),
            "precision": v.tags.get("precision", "float32"),
            "source": v.tags.get("source", "-"),
            "run_id": v.run_id or "-",
        }
        for v in versions
    ]


def _has_model(name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        _client().get_registered_model(name)
        return True
    except MlflowException:
        return False
