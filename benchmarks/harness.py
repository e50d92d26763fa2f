"""What the benchmarks share: the machine's name and kind, a clock, options, training, and the records (one
JSON line per measurement in ``results/<script>.jsonl``; ``results.py`` makes RESULTS.md from them)."""

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tarfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORDS = Path(__file__).parent / "results"
DEFAULT_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
FIELDS = ("benchmark", "machine_kind", "cpu", "figures", "seeds", "date", "commit", "command")
SHARED = {  # options several benchmarks take
    "--experiment": {"default": "cpu"},
    "--set": {"dest": "overrides", "action": "append", "default": [], "help": "recipe override KEY=VALUE"},
    "--device": {"default": "auto"},
    "--data-dir": {"type": Path, "help": "the prepared cache (default: data/)"},
    "--archive": {"type": Path, "default": DEFAULT_ARCHIVE, "help": "the JPEG archive"},
    "--seeds": {"type": int, "default": 1},
}
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def cpu_info() -> tuple[str, set[str], str]:
    """(model name with its family and model, flags, family) from /proc/cpuinfo."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine(), set(), ""
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}
    name, family = fields.get("model name", platform.machine()), fields.get("cpu family", "")
    if family:  # "AMD EPYC" alone names Zen 4 (family 25) and Zen 5 (26), whose bf16 speeds differ
        name += f" family {family} model {fields.get('model', '?')}"
    return name, set(fields.get("flags", "").split()), family


def gpu_name(device) -> str | None:
    """The GPU's name, unless ``device`` is the CPU or there is no GPU."""
    if str(device) != "cpu":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine_kind(device="cpu") -> str:
    """The GPU's name, or what CPU speeds depend on most: "AMX", "Zen 5 bf16", "Zen 4 bf16", "AVX2 fp32", ..."""
    _, flags, family = cpu_info()
    if gpu := gpu_name(device):
        return gpu
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:  # Zen 4's bf16 steps take 1.6-1.8x Zen 5's
        return {"25": "Zen 4 bf16", "26": "Zen 5 bf16"}.get(family, "AVX512 bf16")
    return "AVX512 fp32" if "avx512f" in flags else "AVX2 fp32" if "avx2" in flags else f"{platform.machine()} fp32"


def machine_name(device="cpu") -> str:
    """'NVIDIA H100 80GB HBM3', or 'Intel(R) Xeon(R) Processor family 6 model 167 (x86_64, AVX512, VNNI, AMX),
    2 cores, 2 threads, native bf16': native bf16 trains about 3x faster than fp32, int8 needs VNNI to gain."""
    if gpu := gpu_name(device):
        return gpu
    import torch

    from cifar.engine import native_bf16

    model, flags, _ = cpu_info()
    vnni = "VNNI" if flags & {"avx512_vnni", "avx_vnni", "amx_int8"} else "no VNNI"
    isa = f"{platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, {vnni}{', AMX' * ('amx_bf16' in flags)}"
    precision = "native bf16" if native_bf16(torch.device("cpu")) else "fp32"
    return f"{model} ({isa}), {os.cpu_count()} cores, {torch.get_num_threads()} threads, {precision}"


def clock(fn, repeats: int, *, warmup: int = 0, before=lambda: None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (``before()`` untimed ahead)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def parser(doc: str, *shared: str, quick: str | None = None) -> argparse.ArgumentParser:
    """The script's options: the ``shared`` ones named, --quick (with its help), --no-results (--no-record)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in shared:
        p.add_argument(name, **SHARED[name])
    if quick:
        p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--no-results", "--no-record", dest="no_results", action="store_true", help="append no record")
    return p


def train(args, experiment: str, overrides=(), **options):
    """(config, outcome) of ``experiment`` trained on ``args.device``, untracked and quiet unless ``options`` say."""
    from cifar.config import load_experiment
    from cifar.engine import device_kind, resolve_device
    from cifar.run.training import TrainOptions, train_experiment

    cfg = load_experiment(experiment, list(overrides), device_kind(resolve_device(args.device)))
    options = {"data_dir": args.data_dir, "device": args.device, "track": False, "progress": False, **options}
    return cfg, train_experiment(cfg, TrainOptions(**options))


def label(model_uri: str) -> str:
    """A model's name in a benchmark's: ``bundled``, ``cifar10-classifier@production``, ``m-<id>``."""
    return re.sub(r"[^\w@=-]+", "-", model_uri.rstrip("/").rsplit("/", 1)[-1])


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:  # no git
        return "unknown"
    return out.strip() or "unknown"


def record(benchmark: str, figures: dict, *, seeds=(), device="cpu", write=True, folder=RECORDS, command=None) -> dict:
    """Print one measurement and append it to ``folder/<script>.jsonl``, the script being ``benchmark`` up to
    its first dot (``time_to_accuracy.speedrun``); RESULTS.md is then made again. Floats keep 4 digits."""
    figures = {k: v.item() if hasattr(v, "item") else v for k, v in figures.items()}  # NumPy scalars
    figures = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in figures.items()}
    command = command or shlex.join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    values = (benchmark, machine_kind(device), cpu_info()[0], figures, list(seeds), str(date.today()), git_commit())
    entry = dict(zip(FIELDS, (*values, command)))
    print(f"{benchmark} on {machine_name(device)}:", *(f"  {k}: {v}" for k, v in figures.items()), sep="\n")
    if write:
        folder.mkdir(exist_ok=True)
        with open(folder / f"{benchmark.split('.')[0]}.jsonl", "a") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        if folder == RECORDS:
            import results

            results.write()
    return entry


def extract_imagefolder(archive: Path, dest: Path, split: str = "train", per_class: int = 0) -> Path:
    """Extract ``<root>/<split>/<class>/*.jpg`` from the JPEG archive (the first ``per_class`` of each)."""
    counts: Counter[str] = Counter()
    with tarfile.open(archive) as tar:
        members = []
        for m in tar:
            parts = Path(m.name).parts
            cls = parts[-2] if m.isfile() and len(parts) >= 4 and parts[-3] == split else None
            if cls and (not per_class or counts[cls] < per_class):
                counts[cls] += 1
                members.append(m)
        tar.extractall(dest, members=members, filter="data")
    return next(dest.rglob(split))
