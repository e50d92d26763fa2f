"""``python -m cifar <command>``: one entry for every documented command."""

from __future__ import annotations

import pytest
from conftest import run_cli

from cifar.__main__ import COMMANDS


def test_lists_every_command_and_refuses_an_unknown_one():
    listing = run_cli(["-m", "cifar"])
    assert listing.returncode == 0
    assert all(f"  {name} " in listing.stdout for name in COMMANDS)
    unknown = run_cli(["-m", "cifar", "trian"])
    assert unknown.returncode == 2 and "no command 'trian'" in unknown.stderr and "Traceback" not in unknown.stderr


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_is_the_documented_program(command):
    """`-h` reaches the command's own parser: its options, its exit status."""
    target = COMMANDS[command][0]
    direct = run_cli([target, "-h"] if target.endswith(".py") else ["-m", target, "-h"])
    entry = run_cli(["-m", "cifar", command, "-h"])
    assert direct.returncode == entry.returncode == 0, entry.stderr[-2000:]
    options = {word for word in direct.stdout.split() if word.startswith("--")}
    assert options and options == {word for word in entry.stdout.split() if word.startswith("--")}


def test_arguments_and_failures_pass_through(prepared_dir):
    env = {"CIFAR_DATA": str(prepared_dir)}
    assert (
        run_cli(["-m", "cifar", "data", "info"], env=env).stdout
        == run_cli(["-m", "cifar.data", "info"], env=env).stdout
    )
    bad = run_cli(["-m", "cifar", "train", "--experiment", "nope"], env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown experiment 'nope'")
