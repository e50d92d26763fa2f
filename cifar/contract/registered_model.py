"""The registered model, as every part of the project names it: one home for these facts.

- its name in the MLflow registry and its aliases (``production`` is what the app serves);
- the tags each registered version carries (``VersionTags``: written and read only through it);
- ``models:/`` URIs: which registry version one points at.

Torch-free and MLflow-lazy, so the slim app imports it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from cifar.contract.trust import headline_ood_auroc, ood_auroc_sets

MODEL_NAME = "cifar10-classifier"
PRODUCTION, PREVIOUS = "production", "previous"  # PREVIOUS: what `register.py --rollback` restores
PRODUCTION_URI = f"models:/{MODEL_NAME}@{PRODUCTION}"  # the default of every command


def model_name(dataset: str | None = None) -> str:
    """A dataset's registered model: ``<dataset>-classifier`` (``cifar10-classifier`` by default)."""
    return f"{dataset or 'cifar10'}-classifier"


def dataset_of(name: str) -> str:
    """The dataset a registered model was named for (``model_name``'s inverse)."""
    return name.removesuffix("-classifier")


def model_title(name: str) -> str:
    """How the app names a registered model's classifier: ``CIFAR-10``, ``Fashion-MNIST``, else the dataset's name."""
    return {"cifar10": "CIFAR-10", "fashion-mnist": "Fashion-MNIST"}.get(dataset_of(name), dataset_of(name))


def production_uri(name: str = MODEL_NAME) -> str:
    """``models:/<name>@production``: what the app serves."""
    return f"models:/{name}@{PRODUCTION}"


TRUST_FIELDS = ("test_ece", "ood_auroc", "ood_auroc_sets", "mean_corruption_accuracy", "temperature")


@dataclass(frozen=True)
class VersionTags:
    """What a registered version says about itself: where it came from and what it was measured to do.

    Floats are stored with six decimals; empty fields are not written. ``extra`` keeps tags this
    schema does not name (``int8_*`` figures of an int8 version, tags other tools set).
    """

    run_id: str = ""
    val_accuracy: float | None = None  # the figure it was chosen on
    test_accuracy: float | None = None  # re-measured at registration, for the record
    run_test_accuracy: float | None = None  # what the training run measured
    git_commit: str = ""
    data_digest: str = ""
    test_data_digest: str = ""
    experiment: str = ""
    study: str = ""
    selection_metric: str = ""
    source: str = ""  # "training run", or "bundled" (models/bundled)
    precision: str = ""  # "" is float32; "int8" (cifar.assess.quantize)
    promotion: str = ""  # won | lost | forced | superseded: what cifar.promote.registry.settle ranks
    test_ece: float | None = None
    ood_auroc: float | None = None  # the lowest over ood_auroc_sets
    ood_auroc_sets: str = ""
    mean_corruption_accuracy: float | None = None
    temperature: float | None = None
    robustness_run_id: str = ""
    evaluation_run_id: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def to_tags(self) -> dict[str, str]:
        tags = {}
        for name, value in asdict(self).items():
            if name == "extra" or value is None or value == "":
                continue
            tags[name] = f"{value:.6f}" if isinstance(value, float) else str(value)
        return {**tags, **self.extra}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> VersionTags:
        known = {f.name: f for f in fields(cls) if f.name != "extra"}
        values, extra = {}, {}
        for key, text in tags.items():
            if key not in known:
                extra[key] = text
            elif "float" in str(known[key].type):
                try:
                    values[key] = float(text)
                except ValueError:
                    values[key] = None  # written empty or by hand: shown as missing
            else:
                values[key] = text
        return cls(**values, extra=extra)

    def with_trust(self, metrics: dict[str, float], corruption: float | None = None) -> VersionTags:
        """These tags with the trust figures of a run's metrics (code names; see ``cifar.contract.trust``)."""
        return replace(
            self,
            test_ece=metrics.get("test_ece_calibrated", self.test_ece),
            ood_auroc=headline_ood_auroc(metrics) if ood_auroc_sets(metrics) else self.ood_auroc,
            ood_auroc_sets=",".join(ood_auroc_sets(metrics)) or self.ood_auroc_sets,
            mean_corruption_accuracy=corruption if corruption is not None else self.mean_corruption_accuracy,
            temperature=metrics.get("temperature", self.temperature),
        )

    @property
    def precision_name(self) -> str:
        return self.precision or "float32"

    def shown(self, name: str, missing: str = "-") -> str:
        """A field as the registry listing and the app show it (the stored text)."""
        return self.to_tags().get(name, missing)

    def trust(self) -> dict[str, str]:
        return {name: self.to_tags()[name] for name in TRUST_FIELDS if name in self.to_tags()}


def registered_version(uri: str, client=None):
    """The registry version a ``models:/name@alias`` or ``models:/name/N`` URI points at; None for others.

    Others: a logged model (``models:/m-...``), ``runs:/``, a local path. An alias or version that
    does not exist raises MLflow's own error.
    """
    if not uri.startswith("models:/") or uri.startswith("models:/m-"):
        return None
    import mlflow  # lazy: ~1 s; the app's start and every command's --help skip it

    client = client or mlflow.MlflowClient()
    body = uri.removeprefix("models:/")
    name, at, alias = body.partition("@")
    if at and "/" not in alias:
        return client.get_model_version_by_alias(name, alias)
    name, _, ref = body.partition("/")
    return client.get_model_version(name, ref) if ref.isdigit() else None


def logged_model_id(uri: str) -> str | None:
    """The MLflow logged model (``m-...``) behind a ``models:/`` URI, registered or not; None for others."""
    if uri.startswith("models:/m-"):
        return uri.removeprefix("models:/").split("/")[0]
    version = registered_version(uri)
    if version is not None and (version.source or "").startswith("models:/m-"):
        return version.source.removeprefix("models:/").split("/")[0]
    return getattr(version, "model_id", None) or None


def pinned_uri(uri: str) -> str:
    """``models:/name@alias`` -> ``models:/name/<version>`` (what the alias means now); others unchanged."""
    name, at, alias = uri.removeprefix("models:/").partition("@")
    if not uri.startswith("models:/") or not at or "/" in alias:
        return uri
    return f"models:/{name}/{registered_version(uri).version}"
