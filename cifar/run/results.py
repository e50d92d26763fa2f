"""A finished training's results as a folder of files: what ``cifar.tracking`` then publishes.

    folder/
      metrics.json        the final metrics (the code's names; tracking gives them their MLflow names)
      tags.json           tags for the run's end: its description, OOD sets not measured
      plots/              training_curves.png
      evaluation/         the test report (cifar.assess.evaluate): confusion matrix, per-class table, ...
      trust/              reliability diagrams, OOD score histogram, trust.json (cifar.assess.recalibrate)
      weights/            model.safetensors + model_config.json
      samples/            a few test images per class with their labels: the app's gallery
      model/              the served model: model.onnx, metadata.json, example.npy
      tensorboard/        augmented_batch.png, for the run's TensorBoard images (not an artifact folder)

Everything here is made by pure report functions; nothing imports MLflow. The data flow stays
one way: engine -> results -> tracking.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

from cifar.config import ExperimentConfig
from cifar.contract.gallery import SAMPLES_FOLDER, write_samples
from cifar.contract.schema import PROBABILITIES
from cifar.contract.trust import headline_ood_auroc
from cifar.data.loader import Augmentation, augment_batch, images_to_tensor
from cifar.plots import training_curves
from cifar.run.calibration import write_trust_report
from cifar.run.classification_report import build_report, write_report
from cifar.run.export import save_weights

ARTIFACT_FOLDERS = ("plots", "evaluation", "trust", "weights", SAMPLES_FOLDER)  # the run's artifact folders, as logged
MODEL_FOLDER, TENSORBOARD_FOLDER = "model", "tensorboard"


@dataclass(frozen=True)
class Results:
    folder: Path
    metrics: dict[str, float]
    tags: dict[str, str]

    @property
    def artifact_dirs(self) -> list[Path]:
        """The folders published as the run's artifact folders of the same names."""
        return [self.folder / name for name in ARTIFACT_FOLDERS if (self.folder / name).is_dir()]

    @property
    def model_dir(self) -> Path:
        return self.folder / MODEL_FOLDER

    @property
    def confusion_png(self) -> Path:
        return self.folder / "evaluation" / "confusion_matrix.png"

    @property
    def augmented_png(self) -> Path:
        return self.folder / TENSORBOARD_FOLDER / "augmented_batch.png"


def write_results(folder: Path, *, cfg: ExperimentConfig, fit, test, data, model, served) -> Results:
    """Every file a tracked run publishes, written into ``folder`` (created).

    ``fit`` and ``test`` are the engine's results; ``served`` (``cifar.run.calibration.ServedModel``) is
    the exported graph with its fitted constants.
    """
    folder.mkdir(parents=True, exist_ok=True)
    calibration = served.calibration
    report = build_report(calibration.outputs["test"][PROBABILITIES], test.labels, data.classes)
    (folder / "plots").mkdir(exist_ok=True)
    training_curves(fit.history, fit.best_epoch).savefig(folder / "plots" / "training_curves.png")
    write_report(report, np.asarray(data.images["test"]), folder / "evaluation")
    write_samples(data.images["test"], test.labels, data.classes, folder / SAMPLES_FOLDER)
    save_weights(model, folder / "weights", served.metadata)
    write_trust_report(calibration, test.labels, folder / "trust")
    write_model_folder(folder / MODEL_FOLDER, served.proto, served.metadata, np.asarray(data.images["val"][:2]))
    (folder / TENSORBOARD_FOLDER).mkdir(exist_ok=True)
    augmented_batch(cfg, data).save(folder / TENSORBOARD_FOLDER / "augmented_batch.png")
    metrics = {
        "best_val_accuracy": fit.best_val_accuracy,
        "best_epoch": fit.best_epoch,
        "test_loss": test.loss,
        "train_seconds": fit.train_seconds,
        **({"compile_seconds": fit.compile_seconds, "recompiles": fit.recompiles} if cfg.train.compile else {}),
        "onnx_max_abs_diff": served.parity,
        **report.metrics(),
        **calibration.profile.metrics,
    }
    not_measured = calibration.profile.not_measured
    tags = {"mlflow.note.content": run_description(cfg, metrics, fit.history[-1].epoch, not_measured)}
    if not_measured:  # visible on the run: a set that could not be measured
        tags["ood_not_measured"] = ",".join(sorted(not_measured))
    if fit.replans:  # a time budget's deadline moved the last epoch (the params hold the first plan)
        tags["budget.epochs_run"] = str(fit.history[-1].epoch)
        tags["budget.replans"] = "; ".join(fit.replans)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (folder / "tags.json").write_text(json.dumps(tags, indent=1))
    return Results(folder, metrics, tags)


def write_model_folder(folder: Path, proto, metadata: dict[str, Any], example: np.ndarray) -> Path:
    """The served model as files: ``model.onnx``, ``metadata.json``, ``example.npy`` (real uint8 images)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(proto.SerializeToString())
    (folder / "metadata.json").write_text(json.dumps(metadata))
    np.save(folder / "example.npy", np.asarray(example, np.uint8))
    return folder


def augmented_batch(cfg: ExperimentConfig, data, count: int = 64):
    """What the network was shown: ``count`` training images through the recipe's augmentation (a PIL grid)."""
    spread = np.linspace(0, len(data.labels["train"]) - 1, count).astype(int)
    sample = images_to_tensor(np.asarray(data.images["train"])[spread], "cpu").float() / 255
    generator = torch.Generator().manual_seed(cfg.train.seed)
    augmented = augment_batch(sample, Augmentation.from_config(cfg.augment), generator)
    return to_pil_image(make_grid(augmented, nrow=8, padding=1).clamp(0, 1))


def run_description(cfg: ExperimentConfig, final: dict[str, float], epochs: int, not_measured=()) -> str:
    """The run page's Description (MLflow's ``mlflow.note.content``): the recipe, the epochs it ran, what it reached."""
    ood = headline_ood_auroc(final)
    lines = [
        f"**{cfg.name}**: {cfg.description or cfg.model.name}",
        "",
        f"- validation accuracy {final['best_val_accuracy']:.4f} (best epoch {final['best_epoch']:.0f} of "
        f"{epochs}), in {final['train_seconds']:.1f} s of training",
        f"- test accuracy {final['test_accuracy']:.4f}",
    ]
    if "test_ece_uncalibrated" in final and "test_ece_calibrated" in final:
        lines[-1] += (
            f"; calibration error (ECE) {final['test_ece_uncalibrated']:.3f} before temperature scaling, "
            f"{final['test_ece_calibrated']:.3f} after"
        )
    if ood is not None:
        lines.append(
            f"- out-of-distribution AUROC {ood:.3f} (the lowest over the sets measured"
            + (f"; not measured: {', '.join(sorted(not_measured))}" if not_measured else "")
            + ")"
        )
    lines.append("- the served model is under Logged models; its figures are in plots/, evaluation/ and trust/")
    return "\n".join(lines)
