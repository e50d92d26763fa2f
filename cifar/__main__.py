"""``python -m cifar <command> [options]``: every command of the project behind one entry.

Each command is the same program as its documented form (``python train.py``,
``python -m cifar eda``, ...), run with the remaining arguments; ``python -m cifar <command> -h``
shows its options.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# command -> (what runs it, one line of help): a module of the package, or a script beside it
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("cifar.data", "prepare|info: decode CIFAR-10 once into the cache"),
    "eda": ("cifar.data.eda", "exploratory data analysis of the cache, as an MLflow run"),
    "train": ("train.py", "train a recipe; every run is an MLflow run"),
    "tune": ("tune.py", "an Optuna study; every trial a nested MLflow run"),
    "register": ("register.py", "promote the best run (chosen on validation) to production"),
    "evaluate": ("cifar.assess.evaluate", "score a logged or registered model on the test split"),
    "calibrate": ("cifar.assess.recalibrate", "refit a model's temperature and 'none of these' threshold"),
    "robustness": ("cifar.assess.robustness", "test accuracy under common corruptions"),
    "quantize": ("cifar.assess.quantize", "an int8 model, calibrated on the validation split"),
    "predict": ("cifar.serve.predict", "predict images with a registered, logged or local model"),
    "compare": ("cifar.assess.compare", "runs side by side"),
    "bundle": ("cifar.promote.bundle", "build the model a fresh clone serves"),
    "sync": ("cifar.promote.sync", "upload runs that finished while the tracking server was away"),
    "stack": ("cifar.ops.localstack", "the team stack on one machine: PostgreSQL and mlflow server"),
    "heroku": ("cifar.ops.heroku", "the folder a Heroku app receives (make heroku), committed for a push"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: python -m cifar <command> [options]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"error: no command {command!r}.\n\n{usage()}", file=sys.stderr)
        return 2
    target = COMMANDS[command][0]
    sys.argv = [f"python -m cifar {command}", *rest]
    try:
        if target.endswith(".py"):
            runpy.run_path(str(ROOT / target), run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as exc:  # every command ends with sys.exit(run_cli(main))
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
