"""``register.py``'s promotion, step by step: choose on validation, decide, assess, register.

    find_best_run -> decide (float32, or again as int8) -> assess -> register_and_promote

``decide_promotion`` changes nothing; ``comparison_rows`` is the table the command prints before
``register_promotion`` writes to the registry. Test accuracy is recorded, never used to choose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cifar.contract.registered_model import MODEL_NAME, VersionTags
from cifar.promote import registry
from cifar.promote.candidates import Candidate


@dataclass(frozen=True)
class PromotionRequest:
    """register.py's options for choosing and promoting."""

    experiments: list[str] | None = None
    study_name: str | None = None
    metric: str = "val_accuracy"
    name: str = MODEL_NAME
    min_improvement: float = 0.0
    force: bool = False
    max_ece: float | None = None
    min_ood_auroc: float | None = None
    int8: bool = False
    max_int8_drop: float = 0.005
    robustness_images: int = 500
    data_dir: Path | None = None  # the dataset's own folder (cifar.data.cache.dataset_dir)
    dataset: str = ""  # runs of this dataset only (default CIFAR-10)
    dry_run: bool = False


@dataclass
class Promotion:
    candidate: Candidate
    decision: registry.Decision
    variant: VersionTags
    assessment: registry.Assessment | None
    already: bool  # the candidate is production already
    notes: list[str] = field(default_factory=list)  # what was done on the way (the int8 model)


def decide_promotion(req: PromotionRequest) -> Promotion:
    """Choose the best run on validation and decide against production; change nothing."""
    candidate = registry.find_best_run(req.experiments, req.study_name, req.metric, req.dataset)
    precision = "int8" if req.int8 else "float32"

    def decide(c: Candidate) -> registry.Decision:
        return registry.decide(c, req.name, req.min_improvement, req.force, req.max_ece, req.min_ood_auroc, precision)

    decision = decide(candidate)
    already = registry.is_production(decision.champion, candidate.run_id, precision)
    variant, notes = VersionTags(), []
    if req.int8 and not (already or decision.refused or req.dry_run):
        # lazy: cifar.assess imports torch, and the slim app's deploy tree (register.py) has neither
        from cifar.assess.quantize import describe, int8_candidate, int8_shortfall, int8_tags

        candidate, quantized = int8_candidate(candidate, req.data_dir)
        notes.append(describe(quantized))
        decision = decide(candidate)  # the int8 model competes on its own validation and trust figures
        variant = int8_tags(quantized)
        shortfall = int8_shortfall(quantized, req.max_int8_drop)
        if shortfall:
            decision.promote, decision.reason, decision.refused = False, shortfall, True
    assessment = (
        None
        if already or decision.refused
        else registry.assess_model(candidate.model_uri, req.data_dir, req.robustness_images)
    )
    return Promotion(candidate, decision, variant, assessment, already, notes)


def register_promotion(p: Promotion, req: PromotionRequest) -> registry.Decision:
    """Register the candidate (production if it won), test accuracy re-measured for the record."""
    p.decision = registry.register_and_promote(p.decision, req.name, req.data_dir, p.assessment, p.variant)
    return p.decision


def _fmt(value) -> str:
    return f"{float(value):.4f}" if value not in (None, "", "-") else "-"


def comparison_rows(p: Promotion) -> list[dict]:
    """The candidate beside production: the chosen metric and the trust figures."""
    c, champion, a = p.candidate, p.decision.champion, p.assessment
    tags = VersionTags.from_tags(champion.tags) if champion else VersionTags()
    return [
        {
            "": "candidate",
            "run_id": c.run_id,
            "version": "(new)",
            c.metric: _fmt(c.value),
            "test_ece": _fmt(c.ece),
            "ood_auroc": _fmt(c.ood_auroc),
            "corruption_acc": _fmt(a.mean_corruption_accuracy) if a else "-",
            "precision": p.variant.precision_name,
            "experiment": c.study or c.experiment,
        },
        {
            "": "production",
            "run_id": champion.run_id if champion else "-",
            "version": champion.version if champion else "-",
            c.metric: _fmt(p.decision.champion_value),
            "test_ece": _fmt(tags.test_ece),
            "ood_auroc": _fmt(tags.ood_auroc),
            "corruption_acc": _fmt(tags.mean_corruption_accuracy),
            "precision": tags.precision_name if champion else "-",
            "experiment": tags.study or tags.experiment or "-" if champion else "-",
        },
    ]
