"""What the benchmarks share: the machine's kind, clocks, options, recipes and their training runs, and
the records (one JSON line per measurement in ``results/<script>.jsonl``; ``results.py`` makes RESULTS.md)."""

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tarfile
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import results
import torch

ROOT, RECORDS = Path(__file__).resolve().parent.parent, results.RECORDS
FIELDS = ("benchmark", "machine_kind", "cpu", "figures", "seeds", "date", "commit", "command")
OPTIONS = {  # the options several benchmarks take, by name
    "experiment": {"default": "cpu"},
    "seeds": {"type": int, "default": 1},
    "set": {"dest": "overrides", "action": "append", "default": [], "help": "recipe override KEY=VALUE"},
    "device": {"default": "auto"},
    "data-dir": {"type": Path, "help": "the prepared cache (default: data/)"},
    "dataset": {"help": "a prepared dataset other than CIFAR-10 (python -m cifar.data prepare --dataset NAME)"},
    "archive": {"type": Path, "default": ROOT.parent / "shared/data/cifar10-jpeg.tar.gz", "help": "the JPEG archive"},
}
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cifar.config import load_experiment  # noqa: E402  (after the path above)
from cifar.engine import device_kind, resolve_device  # noqa: E402
from cifar.run.training import TrainOptions, train_experiment  # noqa: E402


def cpu_info() -> tuple[str, set[str], str]:
    """(model name with its family and model, flags, family) from /proc/cpuinfo."""
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}
    name, family = fields.get("model name", platform.processor() or platform.machine()), fields.get("cpu family", "")
    if family:  # "AMD EPYC" alone names Zen 4 (family 25) and Zen 5 (26), whose bf16 speeds differ
        name += f" family {family} model {fields.get('model', '?')}"
    return name, set(fields.get("flags", "").split()), family


def machine_kind(device="cpu") -> str:
    """The GPU's name, or what CPU speeds depend on most: "AMX", "Zen 5 bf16", "Zen 4 bf16", "AVX2 fp32", ..."""
    _, flags, family = cpu_info()
    if str(device) != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:  # Zen 4's bf16 steps take 1.6-1.8x Zen 5's
        return {"25": "Zen 4 bf16", "26": "Zen 5 bf16"}.get(family, "AVX512 bf16")
    return "AVX512 fp32" if "avx512f" in flags else "AVX2 fp32" if "avx2" in flags else f"{platform.machine()} fp32"


def timed(fn, *args, **kwargs) -> tuple:
    """(``fn(*args, **kwargs)``, its wall seconds), the GPU's queued work included where CUDA is already in use."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else lambda: None
    sync()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    sync()
    return out, time.perf_counter() - start


def clock(fn, repeats: int, *, warmup: int = 0, before=lambda: None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (``before()`` untimed ahead)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        before()
        times.append(timed(fn)[1])
    return times


def spread(name: str, values) -> dict[str, float]:
    """``{name: mean}``, and ``{"<name> std": standard deviation}`` over several values."""
    values = list(values)
    return {name: statistics.mean(values)} | ({f"{name} std": statistics.stdev(values)} if len(values) > 1 else {})


def parser(doc: str, shared: str = "", quick: str | None = None) -> argparse.ArgumentParser:
    """The script's options: the ``shared`` ones named (``"seeds set"``), --quick (its help), --no-results."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in shared.split():
        p.add_argument(f"--{name}", **OPTIONS[name])
    if quick:
        p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--no-results", action="store_true", help="measure without appending a record")
    return p


def config(args, experiment: str, overrides=()):
    """The recipe ``experiment`` with ``overrides``, as a run on ``args.device`` resolves it."""
    return load_experiment(experiment, list(overrides), device_kind(resolve_device(args.device)))


def train(args, experiment: str, overrides=(), **options):
    """(config, outcome) of ``experiment`` trained on ``args.device``, untracked and quiet unless ``options`` say."""
    options = {"data_dir": args.data_dir, "device": args.device, "track": False, "progress": False,
               "dataset": getattr(args, "dataset", None), **options}  # fmt: skip
    return (cfg := config(args, experiment, overrides)), train_experiment(cfg, TrainOptions(**options))


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:  # no git
        return ""


def record(benchmark: str, figures: dict, args=None, *, seeds=None, device=None, folder=RECORDS, command=None):
    """Print one measurement and, unless ``args.no_results``, append it to ``folder/<script>.jsonl``, the script
    being ``benchmark`` up to its first dot (``time_to_accuracy.speedrun``); RESULTS.md is then made again.
    Seeds and device default to ``args``'; floats keep 4 digits."""
    seeds = range(getattr(args, "seeds", 0)) if seeds is None else seeds
    device = device or getattr(args, "device", "cpu")
    figures = {k: v.item() if hasattr(v, "item") else v for k, v in figures.items()}  # NumPy scalars
    figures = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in figures.items()}
    command = command or shlex.join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    kind, cpu, commit = machine_kind(device), cpu_info()[0], git_commit().strip() or "unknown"
    entry = dict(zip(FIELDS, (benchmark, kind, cpu, figures, list(seeds), str(date.today()), commit, command)))
    print(f"{benchmark} on {kind} ({cpu}):", *(f"  {k}: {v}" for k, v in figures.items()), sep="\n")
    if not getattr(args, "no_results", False):
        folder.mkdir(exist_ok=True)
        with open(folder / f"{benchmark.split('.')[0]}.jsonl", "a") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        if folder == RECORDS:
            results.write()
    return entry


def extract_imagefolder(archive: Path, dest: Path, split: str = "train", per_class: int = 0) -> Path:
    """Extract ``<root>/<split>/<class>/*.jpg`` from the JPEG archive (the first ``per_class`` of each)."""
    by_class = defaultdict(list)
    with tarfile.open(archive) as tar:
        for m in tar:
            if m.isfile() and len(parts := Path(m.name).parts) >= 4 and parts[-3] == split:
                by_class[parts[-2]].append(m)
        tar.extractall(dest, members=[m for ms in by_class.values() for m in ms[: per_class or None]], filter="data")
    return next(dest.rglob(split))
