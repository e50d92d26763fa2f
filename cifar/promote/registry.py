"""The MLflow model registry: register the chosen run (``cifar.promote.candidates``), promote, roll back.

Promotion is champion/challenger: the alias ``production`` (MLflow 3's convention; the app
loads ``models:/cifar10-classifier@production``) moves only when the challenger beats the
champion on the validation metric, and when it meets the trust minimums asked for (calibration
error, out-of-distribution AUROC). The legacy stage "Production" follows the alias, so older
clients agree. The test split is evaluated for the record, never used to choose.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cifar.contract import schema
from cifar.contract.registered_model import (
    MODEL_NAME,
    PREVIOUS,
    PRODUCTION,
    VersionTags,
    production_uri,
    registered_version,
)
from cifar.data import ensure_cache
from cifar.data.sources import CIFAR10_CLASSES
from cifar.errors import CifarError
from cifar.locks import sqlite_lock
from cifar.promote.candidates import METRIC_ALIASES, Candidate, find_best_run, has_trained_runs  # noqa: F401 (re-exported)
from cifar.serve.inference import Predictor
from cifar.tracking.store import _mlflow


def _client():
    return _mlflow().MlflowClient()


def _tracking_uri() -> str:
    return _mlflow().get_tracking_uri()


@dataclass(frozen=True)
class Assessment:
    """Measured at registration, for the record: never used to choose between runs."""

    test_accuracy: float
    test_data_digest: str
    mean_corruption_accuracy: float | None  # None: not measured (--robustness-images 0)


def assess_model(model_uri: str, data_dir: Path | None = None, robustness_images: int = 500) -> Assessment:
    """Re-evaluate a logged model through the serving path (ONNX Runtime): test split, corruptions."""
    # lazy: the slim app's deploy tree has no cifar/assess (register.py --import-bundled never assesses)
    from cifar.assess.robustness import corruption_table, mean_corruption_accuracy, sample_test_split

    data = ensure_cache(data_dir)
    predictor = Predictor.from_uri(model_uri)
    accuracy = float((predictor.predicted_classes(np.asarray(data.images["test"])) == data.labels["test"]).mean())
    corruption = None
    if robustness_images > 0:
        images, labels = sample_test_split(data, robustness_images)
        corruption = mean_corruption_accuracy(corruption_table(predictor.predicted_classes, images, labels))
    return Assessment(accuracy, data.digest, corruption)


def production_version(name: str = MODEL_NAME):
    mlflow = _mlflow()
    try:
        return registered_version(production_uri(name), _client())
    except mlflow.exceptions.MlflowException:
        return None


def registry_lock():
    """Serialise promotions on a local SQLite store."""
    return sqlite_lock(_tracking_uri(), "register")


CONTENDING = ("won", "forced")  # VersionTags.promotion of a version that may be production
COMPETED = (*CONTENDING, "superseded")  # ... and of one that was: what --rollback may restore


def _rank(version) -> tuple[float, int]:
    """Better on validation first; on a tie the earlier version (a tie never promotes)."""
    val = VersionTags.from_tags(version.tags).val_accuracy
    return (float("-inf") if val is None else val, -int(version.version))


def standing(versions) -> tuple[str | None, str | None]:
    """What production and previous should be, from the versions' own promotion tags alone.

    Production is the best contender on validation; previous the best other version that has
    competed (a superseded production included, so --rollback undoes a --force).
    """
    contenders = [v for v in versions if v.tags.get("promotion") in CONTENDING]
    if not contenders:
        return None, None
    best = max(contenders, key=_rank)
    others = [v for v in versions if v.version != best.version and v.tags.get("promotion") in COMPETED]
    return str(best.version), (str(max(others, key=_rank).version) if others else None)


def settle(name: str, attempts: int = 20) -> None:
    """Point production, previous and the stage at ``standing``, until a fresh read agrees.

    Promoters decide on what they read, and on a shared server another one may write between
    that read and their own write: no lock spans both. So every promoter, after writing its tags,
    repairs the aliases from the registry's state. Its last read comes after every other
    promoter's tags, so any interleaving ends in the same registry.
    """
    client = _client()
    for _ in range(attempts):
        versions = client.search_model_versions(f"name = '{name}'")
        aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
        current = aliases.get(PRODUCTION)
        # Aliases set before these tags (older registries): production stays a contender, previous competed.
        legacy = {current: "won", aliases.get(PREVIOUS): "superseded"}
        for v in versions:
            if not v.tags.get("promotion") and legacy.get(str(v.version)):
                v.tags["promotion"] = legacy[str(v.version)]
                client.set_model_version_tag(name, v.version, "promotion", v.tags["promotion"])
        production, previous = standing(versions)
        staged = sorted(str(v.version) for v in versions if v.current_stage == "Production")
        if production is None or (current, aliases.get(PREVIOUS), staged) == (production, previous, [production]):
            return
        try:
            client.set_registered_model_alias(name, PRODUCTION, production)
            if previous is not None:
                client.set_registered_model_alias(name, PREVIOUS, previous)
            elif PREVIOUS in aliases:
                client.delete_registered_model_alias(name, PREVIOUS)
            _sync_stage(name, production, versions)
        except _mlflow().exceptions.MlflowException as exc:
            # MLflow's store sets an alias by select-then-insert: two promoters creating the same one at
            # once make one a unique-key violation. Another promoter wrote it: read again and repair.
            if "unique" not in str(exc).lower() and "duplicate key" not in str(exc).lower():
                raise
    raise CifarError(f"the registry of '{name}' kept changing while promoting; run python register.py --list to check")


def _sync_stage(name: str, production: str, versions) -> None:
    """The legacy stage follows the alias: the production version is the one 'Production'."""
    client = _client()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # Archive the others one by one: MLflow 3.17's archive_existing_versions=True compares an
        # integer column with text and fails on a PostgreSQL backend store.
        for other in versions:
            if str(other.version) != production and other.current_stage == "Production":
                client.transition_model_version_stage(name, other.version, "Archived")
        client.transition_model_version_stage(name, production, "Production")


def pin(name: str, version: str, outcome: str) -> None:
    """Make ``version`` the best contender: tag it, and supersede the contenders that rank above it."""
    client = _client()
    client.set_model_version_tag(name, version, "promotion", outcome)
    versions = client.search_model_versions(f"name = '{name}'")
    (chosen,) = [v for v in versions if str(v.version) == str(version)]
    for v in versions:
        if v.tags.get("promotion") in CONTENDING and v is not chosen and _rank(v) > _rank(chosen):
            client.set_model_version_tag(name, v.version, "promotion", "superseded")


def _version_for_run(name: str, run_id: str, precision: str = "float32"):
    mlflow = _mlflow()
    try:
        versions = _client().search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except mlflow.exceptions.MlflowException:
        return None
    versions = [v for v in versions if VersionTags.from_tags(v.tags).precision_name == precision]
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
    forced: bool = False  # --force: production whatever the ranking (settle keeps it there)


def trust_shortfall(candidate: Candidate, max_ece: float | None, min_ood_auroc: float | None) -> str | None:
    """Why the candidate misses a required trust minimum, or None when it meets them all."""
    fix = f"measure it with: python -m cifar calibrate --run-id {candidate.run_id}"
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
    champion_value = VersionTags.from_tags(champion.tags).val_accuracy if champion else None
    if is_production(champion, candidate.run_id, precision):
        return Decision(candidate, champion, champion_value, False, "the candidate already is production")
    shortfall = trust_shortfall(candidate, max_ece, min_ood_auroc)
    if shortfall:  # an explicit minimum: --force does not override it
        return Decision(candidate, champion, champion_value, False, shortfall, refused=True)
    if force:
        return Decision(candidate, champion, champion_value, True, "--force", forced=True)
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
    return (
        champion is not None
        and champion.run_id == run_id
        and VersionTags.from_tags(champion.tags).precision_name == precision
    )


def register_and_promote(
    decision: Decision,
    name: str,
    data_dir: Path | None = None,
    assessment: Assessment | None = None,
    variant: VersionTags | None = None,
) -> Decision:
    """Register the candidate (once per run and precision) and, if decided, move ``production`` to it."""
    mlflow = _mlflow()
    c = decision.candidate
    if decision.refused:
        raise CifarError(f"run {c.run_id} was not registered: {decision.reason}.")
    # measured before any write: no half-written registry
    assessment = assessment or assess_model(c.model_uri, data_dir)
    test_accuracy, digest = assessment.test_accuracy, assessment.test_data_digest
    decision.test_accuracy = test_accuracy
    client = _client()
    with registry_lock():
        variant = variant or VersionTags()  # an int8 version: its precision and int8_* figures
        existing = _version_for_run(name, c.run_id, variant.precision_name)
        trust = VersionTags().with_trust(c.trust, assessment.mean_corruption_accuracy)
        if existing is None:
            tags = replace(
                trust,
                run_id=c.run_id,
                val_accuracy=c.value,
                test_accuracy=test_accuracy,
                run_test_accuracy=c.run_test_accuracy,
                git_commit=c.git_commit,
                data_digest=c.data_digest,
                test_data_digest=digest,
                experiment=c.experiment,
                study=c.study,
                selection_metric=c.metric,
                source="training run",
                precision=variant.precision,
                promotion="won" if decision.promote and not decision.forced else "lost",
                extra=variant.extra,
            )
            version = mlflow.register_model(c.model_uri, name, tags=tags.to_tags())
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
            for key, value in trust.to_tags().items():
                client.set_model_version_tag(name, existing.version, key, value)  # e.g. calibrated since
        if decision.forced:
            pin(name, decision.version, "forced")
        elif decision.promote and existing is not None:
            client.set_model_version_tag(name, existing.version, "promotion", "won")
        settle(name)
    return decision


def describe_registered_model(name: str = MODEL_NAME) -> None:
    """Give the registered model its description (what it is, its input and outputs) if it has none yet."""
    client = _client()
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=schema.model_description(CIFAR10_CLASSES))


def rollback(name: str = MODEL_NAME) -> tuple[str, str]:
    """Move ``production`` back to ``previous`` (and ``previous`` to the version rolled back)."""
    mlflow = _mlflow()
    client = _client()
    with registry_lock():
        current = production_version(name)
        try:
            previous = registered_version(f"models:/{name}@{PREVIOUS}", client)
        except mlflow.exceptions.MlflowException:
            previous = None
        if current is None or previous is None:
            raise CifarError(
                f"nothing to roll back to: '{name}' has no '{PREVIOUS}' alias (see python register.py --list)."
            )
        pin(name, previous.version, "won")
        settle(name)
    return current.version, previous.version


def list_versions(name: str = MODEL_NAME) -> list[dict]:
    mlflow = _mlflow()
    client = _client()
    try:
        versions = client.search_model_versions(f"name='{name}'", order_by=["version_number DESC"])
    except mlflow.exceptions.MlflowException:
        return []
    aliases: dict[str, list[str]] = {}
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        for alias, version in client.get_registered_model(name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in versions:
        tags = VersionTags.from_tags(v.tags)
        rows.append(
            {
                "version": v.version,
                "aliases": ",".join(sorted(aliases.get(str(v.version), []))) or "-",
                "stage": v.current_stage,
                "val_accuracy": tags.shown("val_accuracy"),
                "test_accuracy": tags.shown("test_accuracy"),
                "test_ece": tags.shown("test_ece"),
                "ood_auroc": tags.shown("ood_auroc"),
                "corruption_acc": tags.shown("mean_corruption_accuracy"),
                "precision": tags.precision_name,
                "source": tags.source or "-",
                "run_id": v.run_id or "-",
            }
        )
    return rows


def _has_model(name: str) -> bool:
    mlflow = _mlflow()
    try:
        _client().get_registered_model(name)
        return True
    except mlflow.exceptions.MlflowException:
        return False
