"""Recipes: shipped experiments load; overrides are typed; mistakes are clear errors."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from cifar.config import ExperimentConfig, TrainConfig, available_experiments, load_experiment, parse_override
from cifar.engine.models import available_models
from cifar.errors import CifarError


@pytest.mark.parametrize("name", available_experiments())
def test_shipped_experiments_load(name):
    cfg = load_experiment(name)
    assert cfg.name == name and cfg.description
    assert cfg.model.name in available_models()


def test_required_experiments_exist():
    assert {"cpu", "baseline", "speedrun", "best"} <= set(available_experiments())
    assert load_experiment("baseline").model.name == "resnet18"


def test_overrides_are_typed():
    cfg = load_experiment("cpu", ["optim.lr=0.2", "train.epochs=3", "train.tta=false", "optim.weight_decay=2e-3"])
    assert cfg.optim.lr == 0.2 and cfg.train.epochs == 3 and cfg.train.tta is False
    assert cfg.optim.weight_decay == 0.002  # YAML 1.1 reads 2e-3 as a string; still a float here
    assert load_experiment("cpu", ["optim.lr=1"]).optim.lr == 1.0  # int where float is expected


def test_an_epoch_count_asked_for_replaces_the_recipes_time_budget():
    """The default recipe trains for 15 minutes; --epochs N (or --set train.epochs=N) trains N epochs."""
    assert load_experiment("cpu").train.time_budget == 900
    assert load_experiment("cpu", ["train.epochs=3"]).train.time_budget == 0
    both = load_experiment("cpu", ["train.epochs=3", "train.time_budget=60"])
    assert both.train.time_budget == 60  # both asked for: the budget decides the epochs
    assert load_experiment("cpu", ["optim.lr=0.2"]).train.time_budget == 900


def test_a_recipe_gives_each_kind_of_machine_its_own_values(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {name: fastnet, width: 0.75}\ntrain: {epochs: 4}\n"
        "devices: {cpu_bf16: {model: {width: 1.0}}, cuda: {train: {batch_size: 1024}}}\n"
    )
    assert load_experiment(str(recipe)).model.width == 0.75  # no kind named: the base values
    assert load_experiment(str(recipe), device_kind="cpu_fp32").model.width == 0.75
    bf16 = load_experiment(str(recipe), device_kind="cpu_bf16")
    assert bf16.model.width == 1.0 and bf16.train.batch_size == TrainConfig().batch_size
    assert load_experiment(str(recipe), device_kind="cuda").train.batch_size == 1024
    assert load_experiment(str(recipe), ["model.width=0.5"], device_kind="cpu_bf16").model.width == 0.5


@pytest.mark.parametrize(
    ("devices", "fragment"),
    [
        ("{tpu: {model: {width: 1.0}}}", "'devices' maps cuda, cpu_bf16, cpu_fp32 to recipe fields"),
        ("{cuda: 3}", "'devices' maps cuda"),
        ("{cuda: {train: {batch_sise: 8}}}", "(devices.cuda): unknown field 'train.batch_sise'"),
        ("{cpu_fp32: {train: {time_budget: -1}}}", "train.time_budget must be 0 (off) or seconds"),
    ],
)
def test_a_bad_devices_section_names_the_recipe_and_the_entry(tmp_path, devices, fragment):
    """Every entry is checked on every machine, not only where it would apply."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"train: {{epochs: 4}}\ndevices: {devices}\n")
    with pytest.raises(CifarError, match=re.escape(fragment)):
        load_experiment(str(recipe), device_kind="cpu_bf16")


def test_config_is_frozen():
    cfg = load_experiment("cpu")
    with pytest.raises(AttributeError):
        cfg.train.epochs = 3


def test_yaml_round_trip_reproduces_the_recipe(tmp_path):
    cfg = load_experiment("cpu", ["optim.lr=0.3", "data.subset=1000"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_experiment(str(path)) == cfg


def test_flat_params():
    flat = load_experiment("cpu").flat()
    assert flat["optim.lr"] == load_experiment("cpu").optim.lr
    assert flat["model.name"] == "fastnet" and "train.seed" in flat


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=0.1", "unknown field 'optim.lrr'"),
        ("optimizer.lr=0.1", "unknown field 'optimizer'"),
        ("train.epochs=three", "'train.epochs' must be int"),
        ("train.epochs=2.5", "'train.epochs' must be int"),
        ("train.tta=3", "'train.tta' must be bool"),
        ("optim=0.1", "'optim' must be a mapping"),
        ("no-equals-sign", "--set expects KEY=VALUE"),
        # ranges are checked where the recipe is built, before any data or model exists
        ("model.width=0", "model.width must be positive, got 0"),
        ("optim.name=lion", "unknown optim.name 'lion': use sgd, adamw or muon"),
        ("schedule.name=step", "unknown schedule.name 'step': use onecycle, cosine or constant"),
        ("train.whiten_bias_epochs=-1", "train.whiten_bias_epochs must be 0"),
        ("train.low_res=8", "train.low_res between 16 and 32 pixels \\(got 8\\)"),
        ("train.tta_translate=5", "train.tta_translate must be 0 to 4 pixels"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(CifarError, match=message):
        load_experiment("cpu", override.split(" "))


def test_unknown_experiment_lists_the_available_ones():
    with pytest.raises(CifarError, match="unknown experiment 'nope'. Available: .*cpu"):
        load_experiment("nope")


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {name: fastnet\n")
    with pytest.raises(CifarError, match="not valid YAML"):
        load_experiment(str(path))


def test_parse_override_nests():
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}


def test_defaults_then_the_yaml_then_the_overrides(tmp_path):
    """What a recipe leaves out is the dataclass default; what it sets wins over that; an override wins over both."""
    path = tmp_path / "mine.yaml"
    path.write_text("train: {epochs: 3, batch_size: 64}\noptim: {lr: 0.5}\n")
    cfg = load_experiment(str(path), ["train.batch_size=32"])
    defaults = ExperimentConfig()
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr) == (3, 32, 0.5)
    assert replace(cfg.train, epochs=defaults.train.epochs, batch_size=defaults.train.batch_size) == defaults.train
    assert replace(cfg.optim, lr=defaults.optim.lr) == defaults.optim
    assert (cfg.model, cfg.schedule, cfg.augment, cfg.data) == (
        defaults.model, defaults.schedule, defaults.augment, defaults.data
    )
