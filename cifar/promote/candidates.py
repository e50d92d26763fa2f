"""Which run to register: the finished run with a logged model and the best validation figure.

Logged models are ranked by their linked validation metric (``mlflow.search_logged_models``).
The test split is never used to choose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cifar.contract.trust import headline_ood_auroc, ood_auroc_sets
from cifar.errors import CifarError
from cifar.tracking.names import code_names, metric_key
from cifar.tracking.store import _mlflow

METRIC_ALIASES = {"val_accuracy": "best_val_accuracy"}


def _client():
    return _mlflow().MlflowClient()


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
        return headline_ood_auroc(self.trust)

    @property
    def ood_basis(self) -> str:
        """Which OOD sets ``ood_auroc`` stands on, and which were not measured."""
        text = ", ".join(f"{name} {value:.4f}" for name, value in ood_auroc_sets(self.trust).items()) or "no set"
        return text + (f"; not measured: {', '.join(self.ood_not_measured)}" if self.ood_not_measured else "")


def _trust_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The calibration and OOD metrics of a run, under their code names."""
    named = code_names(metrics)
    return {k: v for k, v in named.items() if k in ("test_ece_calibrated", "temperature") or k.startswith("ood_")}


def find_best_run(
    experiments: list[str] | None = None, study: str | None = None, metric: str = "val_accuracy", dataset: str = ""
) -> Candidate:
    """The FINISHED run of ``dataset`` (default CIFAR-10) with a logged model and the highest validation
    ``metric`` linked to that model."""
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
    leader = _leader_by_model(ids, key, study, dataset or "cifar10")
    if leader is None:
        scope = f"study '{study}'" if study else f"experiment(s) {', '.join(names)}" if names else "any experiment"
        scope += f" of dataset {dataset}" if dataset else ""
        raise CifarError(
            f"no finished run with a logged model and metric '{key}' in {scope} ({_tracking_uri()}). "
            "Train one first: python train.py (or python tune.py)."
        )
    best, metric_name, value = leader
    tags, metrics = best.data.tags, best.data.metrics
    experiment = client.get_experiment(best.info.experiment_id).name
    return Candidate(
        best.info.run_id,
        tags["model_uri"],
        metric_name,
        value,
        metrics.get(metric_key("test_accuracy")),
        experiment,
        tags.get("optuna_study", ""),
        tags.get("git_commit", "unknown"),
        tags.get("data_digest", "unknown"),
        _trust_metrics(metrics),
        tuple(filter(None, tags.get("ood_not_measured", "").split(","))),
    )


def _eligible(run, study: str | None, dataset: str) -> bool:
    tags = run.data.tags
    if run.info.status != "FINISHED" or not tags.get("model_uri") or tags.get("dataset", "cifar10") != dataset:
        return False
    return not study or (tags.get("optuna_study") == study and tags.get("trial_state") == "COMPLETE")


def _leader_by_model(ids: list[str], key: str, study: str | None, dataset: str):
    """(run, metric, value) of the best logged model by its linked ``key`` metric, or None."""
    if not ids:
        return None
    models = _mlflow().search_logged_models(
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
        if _eligible(run, study, dataset) and run.data.tags["model_uri"] == f"models:/{model.model_id}":
            value = max(m.value for m in model.metrics if m.key == key)
            return run, key, float(value)
    return None


def has_trained_runs() -> bool:
    """Whether the store holds a finished training run with a logged model (the bundled model's run aside)."""
    client = _client()
    ids = [e.experiment_id for e in client.search_experiments() if e.name != "bundled-model"]
    query = "attributes.status = 'FINISHED' and tags.model_uri != ''"
    return bool(ids) and bool(client.search_runs(ids, query, max_results=1))


def _tracking_uri() -> str:
    return _mlflow().get_tracking_uri()
