"""Experiment recipes: defaults -> ``experiments/<name>.yaml`` -> command-line overrides.

A recipe is a tree of frozen dataclasses. ``--set optim.lr=0.2`` changes one leaf, with its
type checked; an unknown key or a wrong type is a clear error, never a silent default.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cifar.errors import CifarError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR = PROJECT_ROOT / "experiments"


def _require(ok: bool, message: str) -> None:
    """A recipe value out of its range: one message naming the field and what it may be."""
    if not ok:
        raise CifarError(message)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "fastnet"
    width: float = 1.0  # channel multiplier (not every model supports it)

    def __post_init__(self) -> None:
        _require(self.width > 0, f"model.width must be positive, got {self.width}.")


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"  # sgd | adamw | muon (Muon for conv filters, Nesterov SGD for the rest)
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    bias_lr_scale: float = 1.0  # learning-rate multiplier for BatchNorm and bias parameters
    muon_lr: float = 0.12  # optim.name=muon: rate of the orthogonalized conv-filter updates
    muon_momentum: float = 0.6

    def __post_init__(self) -> None:
        _require(self.name in ("sgd", "adamw", "muon"), f"unknown optim.name '{self.name}': use sgd, adamw or muon.")


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "onecycle"  # onecycle (linear warm-up then linear decay) | cosine | constant
    warmup_fraction: float = 0.2
    final_lr_fraction: float = 0.0

    def __post_init__(self) -> None:
        _require(
            self.name in ("onecycle", "cosine", "constant"),
            f"unknown schedule.name '{self.name}': use onecycle, cosine or constant.",
        )


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = True
    alternate_flip: bool = False  # derandomized flip (airbench): each image mirrored every other epoch
    translate: int = 2
    cutout: int = 0


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 512
    eval_batch_size: int = 1000
    label_smoothing: float = 0.2
    ema_decay: float = 0.0  # 0 = no weight EMA
    lookahead: bool = False  # Lookahead averaging that strengthens towards the end (cifar.engine.optim)
    whiten_bias_epochs: int = 0  # fastnet: the whitening bias learns this many epochs, then freezes (0 = always)
    # Progressive resizing: the first low_res_epochs train on batches downscaled to low_res pixels
    # (a 24-pixel step costs about 0.6 of a 32-pixel one); validation and test stay at full size.
    low_res_epochs: int = 0
    low_res: int = 24
    tta: bool = True  # flip test-time augmentation at evaluation
    # With tta, also score the image shifted this many pixels up-left and down-right (reflect-padded),
    # each with its mirror (airbench's mirror + translate TTA): 6 passes instead of 2 (0 = flip only;
    # without tta, no TTA at all, so `--set train.tta=false` turns off both).
    tta_translate: int = 0
    seed: int = 0
    amp: bool = True  # bf16 autocast where native: GPUs, CPUs with AMX/AVX512-BF16 (engine.native_bf16)
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False
    checkpoint_every: int = 1  # epochs between checkpoints of a tracked run (0 = only when interrupted)
    # Epochs between validation passes; the last epoch is always validated (0 = only the last).
    # A pass skipped is time off the training clock; the best epoch is chosen among those validated.
    eval_every: int = 1
    # Seconds of training on this machine (0 = off): a few steps are timed first, then train.epochs
    # is set to what fits (cifar.engine.budget); the run logs the plan.
    time_budget: float = 0.0

    def __post_init__(self) -> None:
        _require(0 <= self.tta_translate <= 4, f"train.tta_translate must be 0 to 4 pixels, got {self.tta_translate}.")
        _require(self.time_budget >= 0, f"train.time_budget must be 0 (off) or seconds, got {self.time_budget}.")
        _require(
            self.eval_every >= 0, f"train.eval_every must be 0 (only the last epoch) or more, got {self.eval_every}."
        )
        _require(
            self.whiten_bias_epochs >= 0,
            f"train.whiten_bias_epochs must be 0 (always learns) or more, got {self.whiten_bias_epochs}.",
        )
        _require(
            self.low_res_epochs >= 0 and 16 <= self.low_res <= 32,
            f"train.low_res_epochs must be 0 or more (got {self.low_res_epochs}) and train.low_res between 16 "
            f"and 32 pixels (got {self.low_res}).",
        )


@dataclass(frozen=True)
class DataConfig:
    subset: int = 0  # training images to use (0 = all); val shrinks in proportion, test never


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "custom"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """``{"optim.lr": 0.1, ...}``: the recipe as MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, sub)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


def available_experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def _check_value(path: str, expected: Any, value: Any) -> Any:
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif expected is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise CifarError(f"'{path}' must be {expected.__name__}, got {value!r} ({type(value).__name__}).")


def _build(cls: type, values: dict[str, Any], prefix: str, origin: str) -> Any:
    if not isinstance(values, dict):
        raise CifarError(f"{origin}: '{prefix or 'the recipe'}' must be a mapping, got {values!r}.")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise CifarError(
            f"{origin}: unknown field '{where}{unknown[0]}'. Known fields{' of ' + prefix if prefix else ''}: "
            f"{', '.join(sorted(known))}."
        )
    kwargs = {}
    for name, value in values.items():
        path = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, path, origin)
        else:
            kwargs[name] = _check_value(path, hint, value)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"optim.lr=0.2"`` -> ``{"optim": {"lr": 0.2}}`` (the value is read as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise CifarError(f"--set expects KEY=VALUE (e.g. optim.lr=0.2), got '{text}'.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    tree: dict[str, Any] = {}
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def resolve_named_yaml(name_or_path: str, folder: Path, kind: str, file_kind: str) -> Path:
    """``name`` -> ``folder/name.yaml``; a ``.yaml`` path is taken as it is. Clear errors for both."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise CifarError(f"{file_kind} '{name_or_path}' does not exist.")
        return path
    candidate = folder / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise CifarError(
            f"unknown {kind} '{name_or_path}'. Available: {known} (files in {folder}), or pass a path to a .yaml file."
        )
    return candidate


def experiment_path(name_or_path: str) -> Path:
    return resolve_named_yaml(name_or_path, EXPERIMENTS_DIR, "experiment", "config file")


def config_from_dict(values: dict[str, Any], origin: str) -> ExperimentConfig:
    """A resolved recipe (``ExperimentConfig.to_dict()``, e.g. from a checkpoint) back to the dataclass."""
    return _build(ExperimentConfig, dict(values), "", origin)


# Machines a recipe may give its own values (its ``devices:`` section); cifar.engine.device_kind names this one.
DEVICE_KINDS = ("cuda", "cpu_bf16", "cpu_fp32")


def _device_variant(values: dict[str, Any], path: Path, device_kind: str | None) -> dict[str, Any]:
    """The recipe with its ``devices.<device_kind>`` fields applied; every variant is checked, whichever is used."""
    variants = values.pop("devices", None) or {}
    valid = isinstance(variants, dict) and all(k in DEVICE_KINDS and isinstance(v, dict) for k, v in variants.items())
    if not valid:
        raise CifarError(
            f"{path}: 'devices' maps {', '.join(DEVICE_KINDS)} to recipe fields "
            f"(e.g. devices: {{cpu_bf16: {{model: {{width: 1.0}}}}}}); got {variants!r}."
        )
    for kind, fields in variants.items():
        _build(ExperimentConfig, _merge(values, fields), "", f"{path} (devices.{kind})")
    return _merge(values, variants.get(device_kind) or {})


def load_experiment(
    name_or_path: str, overrides: list[str] | tuple[str, ...] = (), device_kind: str | None = None
) -> ExperimentConfig:
    """Resolve a recipe: dataclass defaults, the YAML file, its ``devices.<device_kind>`` fields, each override.

    A recipe can choose values by machine (``devices: {cpu_bf16: {model: {width: 1.0}}}``): the
    caller names its kind (``cifar.engine.device_kind``); without one, the base values stand.
    An override of ``train.epochs`` without one of ``train.time_budget`` turns the recipe's budget
    off: the epochs asked for are trained.
    """
    path = experiment_path(name_or_path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CifarError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise CifarError(f"{path} must hold a mapping of recipe fields.")
    values.setdefault("name", path.stem)
    values = _device_variant(values, path, device_kind)
    _build(ExperimentConfig, values, "", str(path))  # errors name the file, not the override
    asked: set[str] = set()
    for text in overrides:
        update = parse_override(text)
        asked |= set(update.get("train", {})) if isinstance(update.get("train"), dict) else set()
        values = _merge(values, update)
        _build(ExperimentConfig, values, "", f"--set {text}")
    if "epochs" in asked and "time_budget" not in asked:  # an epoch count asked for replaces the recipe's budget
        values = _merge(values, {"train": {"time_budget": 0}})
    return _build(ExperimentConfig, values, "", str(path))
