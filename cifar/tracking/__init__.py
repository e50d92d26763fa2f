"""The only package that talks to MLflow about runs: store, training runs, studies, the outbox."""

from cifar.tracking.runs import TensorBoardLog, TrainingRun, download_checkpoint
from cifar.tracking.store import (
    MODEL_ARTIFACT,
    TRIAL_RUN_ATTR,
    check_tracking_store,
    git_state,
    log_derived_model,
    log_onnx_model,
    onnx_signature,
    redact_url,
    replace_logged_model,
    save_onnx_model_folder,
)
from cifar.tracking.studies import close_run, study_parent_run, summarize_study

__all__ = [
    "MODEL_ARTIFACT",
    "TRIAL_RUN_ATTR",
    "TensorBoardLog",
    "TrainingRun",
    "check_tracking_store",
    "close_run",
    "download_checkpoint",
    "git_state",
    "log_derived_model",
    "log_onnx_model",
    "onnx_signature",
    "redact_url",
    "replace_logged_model",
    "save_onnx_model_folder",
    "study_parent_run",
    "summarize_study",
]
