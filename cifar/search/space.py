"""Search spaces as data: ``experiments/search/<name>.yaml`` -> checked params -> Optuna suggestions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cifar.config import EXPERIMENTS_DIR, ExperimentConfig, resolve_named_yaml
from cifar.errors import CifarError


@dataclass(frozen=True)
class Param:
    name: str  # a recipe field, e.g. "optim.lr"
    type: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    condition: dict[str, Any] = field(default_factory=dict)  # suggest only when these params have these values

    def describe(self) -> str:
        if self.type == "categorical":
            text = f"categorical{list(self.choices)}"
        else:
            text = f"{self.type}[{self.low}, {self.high}{', log' if self.log else ''}]"
        return text + (f" if {self.condition}" if self.condition else "")


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]
    sampler: dict[str, Any]  # every setting resolved (sampler_settings)
    pruner: dict[str, Any]
    source: str
    importance: str = "ped_anova"  # the evaluator of the parameter-importance plot

    def as_params(self) -> dict[str, str]:
        return {f"space.{p.name}": p.describe() for p in self.params}


# Optuna 5 changed TPESampler's defaults (multivariate and constant liar on), so a space states its
# sampler's settings; these are what a file that leaves one out gets, and they are logged either way.
SAMPLER_SETTINGS = {
    "tpe": {"startup_trials": 5, "multivariate": True, "group": True, "constant_liar": True},
    "random": {},
}
IMPORTANCE_EVALUATORS = ("ped_anova", "fanova", "mean_decrease_impurity")


def sampler_settings(raw: dict[str, Any] | None, where: str) -> dict[str, Any]:
    """A space file's ``sampler`` with every setting resolved, or one clear error."""
    raw = dict(raw or {})
    name = raw.pop("name", "tpe")
    if name not in SAMPLER_SETTINGS:
        raise CifarError(f"{where}: unknown sampler '{name}': use {' or '.join(SAMPLER_SETTINGS)}.")
    defaults = SAMPLER_SETTINGS[name]
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        known = ", ".join(defaults) or "none"
        raise CifarError(f"{where}: sampler {name} has no setting {', '.join(unknown)} (known: {known}).")
    settings = {**defaults, **raw}
    for key, default in defaults.items():
        if not isinstance(settings[key], type(default)):
            raise CifarError(f"{where}: sampler setting {key} must be {type(default).__name__}, not {settings[key]!r}.")
    return {"name": name, **settings}


def space_path(name_or_path: str) -> Path:
    return resolve_named_yaml(name_or_path, EXPERIMENTS_DIR / "search", "search space", "search space file")


def load_space(name_or_path: str, base: ExperimentConfig) -> SearchSpace:
    """Read and check a search space against the recipe it searches."""
    path = space_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CifarError(f"{path} is not valid YAML: {exc}") from None
    known = base.flat()
    params = []
    for name, spec in (raw.get("params") or {}).items():
        where = f"{path}: parameter '{name}'"
        if name not in known:
            raise CifarError(f"{where} is not a recipe field. Known fields: {', '.join(sorted(known))}.")
        if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "categorical"):
            raise CifarError(f"{where} needs type: float, int or categorical.")
        if spec["type"] == "categorical":
            choices = tuple(spec.get("choices") or ())
            if not choices:
                raise CifarError(f"{where} has no choices.")
            param = Param(name, "categorical", choices=choices, condition=spec.get("condition") or {})
        else:
            try:
                low, high = float(spec["low"]), float(spec["high"])
            except (KeyError, TypeError, ValueError):
                raise CifarError(f"{where} needs numeric low and high.") from None
            if not low < high:
                raise CifarError(f"{where} has an empty or inverted range [{low}, {high}]; low must be below high.")
            log = bool(spec.get("log", False))
            if log and low <= 0:
                raise CifarError(f"{where} is log-scaled, so low must be positive (got {low}).")
            param = Param(name, spec["type"], low, high, log, spec.get("step"), condition=spec.get("condition") or {})
        params.append(param)
    if not params:
        raise CifarError(f"{path} defines no params.")
    names = {p.name for p in params}
    for p in params:
        for other in p.condition:
            if other not in names:
                raise CifarError(f"{path}: condition of '{p.name}' refers to '{other}', which is not searched.")
    # Suggest a parameter only after those its condition reads, whatever the file's key order.
    ordered: list[Param] = []
    while len(ordered) < len(params):
        ready = [p for p in params if p not in ordered and all(o in {q.name for q in ordered} for o in p.condition)]
        if not ready:
            raise CifarError(f"{path}: the conditions form a cycle.")
        ordered.extend(ready)
    importance = raw.get("importance", "ped_anova")
    if importance not in IMPORTANCE_EVALUATORS:
        raise CifarError(f"{path}: importance must be one of {', '.join(IMPORTANCE_EVALUATORS)}, not '{importance}'.")
    sampler = sampler_settings(raw.get("sampler"), str(path))
    return SearchSpace(tuple(ordered), sampler, raw.get("pruner") or {}, str(path), importance)


def suggest(trial, space: SearchSpace) -> dict[str, Any]:
    """Draw one recipe change per parameter whose condition holds."""
    chosen: dict[str, Any] = {}
    for p in space.params:
        if any(chosen.get(k) != v for k, v in p.condition.items()):
            continue
        if p.type == "categorical":
            chosen[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.type == "int":
            chosen[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            chosen[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
    return chosen
