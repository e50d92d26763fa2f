"""``make heroku`` (``python -m cifar heroku``): the folder a Heroku app receives, from this checkout.

The Python buildpack installs the root ``requirements.txt``, which in this repository is the
training stack (torch and CUDA, about 7 GB installed; a slug may be 500 MB). The deploy tree has
the app's slim requirements at its root instead, and only what the dyno runs: the Procfile's
``register.py --import-bundled`` and ``streamlit_app/app.py``, the part of ``cifar/`` they import,
and the bundled model. The tree is a git repository of its own (one commit per build that changed
something), so deploying is one push:

    make heroku        # or: python -m cifar heroku [--out build/heroku]
    git -C build/heroku push "$(git remote get-url heroku)" HEAD:main
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from cifar.errors import CifarError

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "build" / "heroku"
# What the dyno imports, found by running the app (a prediction and its "About the model" tab) and
# register.py --import-bundled in the slim venv under python -X importtime. tests/test_heroku.py
# deploys the tree the buildpack's way and fails when one is missing.
FILES = (
    "Procfile",
    ".python-version",
    ".streamlit",
    "streamlit_app",
    "register.py",
    "models/bundled",
    "cifar/__init__.py",
    "cifar/cli.py",
    "cifar/config.py",
    "cifar/errors.py",
    "cifar/settings.py",
    "cifar/locks.py",
    "cifar/contract",
    "cifar/data/__init__.py",
    "cifar/data/cache.py",
    "cifar/data/sources.py",
    "cifar/data/fashion_mnist.py",
    "cifar/promote/__init__.py",
    "cifar/promote/bundle.py",
    "cifar/promote/candidates.py",
    "cifar/promote/promotion.py",
    "cifar/promote/registry.py",
    "cifar/serve",
    "cifar/tracking",
)
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "secrets.toml")  # never ship local secrets


def build(out: Path = OUT) -> Path:
    """Write the deploy tree to ``out``, replacing an earlier build there (its .git stays)."""
    out = out.resolve()
    if ROOT.is_relative_to(out):
        raise CifarError(f"--out {out} holds the checkout itself; choose a folder of its own.")
    if out.exists() and any(out.iterdir()) and not (out / "Procfile").exists():
        raise CifarError(f"{out} is not empty and holds no earlier deploy tree; choose an empty folder.")
    if out.exists():
        for child in out.iterdir():
            if child.name != ".git":  # the deploy history: each build is one commit on top
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    for rel in FILES:
        source, target = ROOT / rel, out / rel
        if not source.exists():
            raise CifarError(f"{rel} is missing from {ROOT}; the app cannot run without it.")
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=SKIP)
        else:
            shutil.copy2(source, target)
    shutil.copy2(ROOT / "streamlit_app" / "requirements.txt", out / "requirements.txt")  # what the buildpack installs
    return out


def commit(out: Path) -> bool:
    """Commit the tree in its own repository; False when git is missing or nothing changed."""
    if shutil.which("git") is None:
        return False
    # A fixed identity: the deploy repository is a build output, not anyone's authored history.
    git = ["git", "-C", str(out), "-c", "user.name=make heroku", "-c", "user.email=heroku@localhost"]
    if not (out / ".git").exists():
        subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    has_head = subprocess.run([*git, "rev-parse", "-q", "--verify", "HEAD"], capture_output=True).returncode == 0
    if has_head and subprocess.run([*git, "diff", "--cached", "--quiet"]).returncode == 0:
        return False
    source = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    subprocess.run([*git, "commit", "-q", "-m", f"deploy tree from {source or 'a checkout without git'}"], check=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifar heroku", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"the deploy tree (default {OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    out = build(args.out)
    committed = commit(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and ".git" not in p.relative_to(out).parts)
    print(f"deploy tree: {out} ({size / 1e6:.1f} MB{', committed' if committed else ''})")
    print(f'deploy it:   git -C {out} push "$(git remote get-url heroku)" HEAD:main')
    return 0


if __name__ == "__main__":
    from cifar.cli import run_cli

    sys.exit(run_cli(main))
