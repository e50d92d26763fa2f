"""The trust record a served model carries: its temperature, its "none of these" threshold and what
they were measured to do (``cifar.run.calibration`` fits and measures them; the graph applies them).

NumPy only: the slim app reads it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# Share of validation images the OOD threshold accepts: a point above the 95% promised for unseen
# CIFAR-10 images, since a 5,000-image quantile and a 10,000-image test rate each move by tenths
# of a point (the test split's rate is measured with every run: ood_accept_rate_in).
ACCEPT_RATE = 0.96


@dataclass(frozen=True)
class TrustProfile:
    """The record of a served model's calibration and "none of these" score: what was fitted and measured.

    The numbers that act are constants of the ONNX graph (``cifar.contract.schema``); this record travels
    beside them in the graph's metadata (written by the same call) for display and for the registry.
    """

    temperature: float = 1.0
    ood_threshold: float | None = None  # on ood_score; None: a model with no "none of these"
    accept_rate: float = ACCEPT_RATE
    score: str = "mahalanobis"  # nearest-class Mahalanobis distance on normalised multi-stage features
    metrics: dict[str, float] = field(default_factory=dict)  # what it was measured to do, for the record
    not_measured: dict[str, str] = field(default_factory=dict)  # OOD set -> why it was not measured
    fit_images: int = 0  # training images the score was fitted on

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> TrustProfile:
        raw = raw or {}
        temperature = float(raw.get("temperature", 1.0))
        threshold = raw.get("ood_threshold")
        if not np.isfinite(temperature) or temperature <= 0 or (threshold is not None and not np.isfinite(threshold)):
            raise ValueError(f"temperature {temperature} / threshold {threshold} are not usable numbers")
        return cls(
            temperature,
            None if threshold is None else float(threshold),
            float(raw.get("accept_rate", ACCEPT_RATE)),
            str(raw.get("score", "mahalanobis")),
            {k: float(v) for k, v in (raw.get("metrics") or {}).items()},
            {str(k): str(v) for k, v in (raw.get("not_measured") or {}).items()},
            int(raw.get("fit_images", 0)),
        )


def ood_auroc_sets(metrics: dict[str, float]) -> dict[str, float]:
    """OOD set -> AUROC, for the sets these metrics measured."""
    return {k.removeprefix("ood_auroc_"): v for k, v in metrics.items() if k.startswith("ood_auroc_")}


def headline_ood_auroc(metrics: dict[str, float]) -> float | None:
    """The OOD AUROC a registry shows and gates on: the lowest over the sets measured (they are named beside it)."""
    values = ood_auroc_sets(metrics)
    return min(values.values()) if values else None
