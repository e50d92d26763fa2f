"""Shared by the benchmarks: the machine's name and the RESULTS.md log."""

from __future__ import annotations

import os
import platform
import sys
import tarfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "RESULTS.md"
DEFAULT_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _cpu_model_and_flags() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    name = fields.get("model name", platform.machine())
    if "cpu family" in fields:  # "AMD EPYC" alone names Zen 4 (family 25) and Zen 5 (26), whose bf16 speeds differ
        name += f" family {fields['cpu family']} model {fields.get('model', '?')}"
    return name, set(fields.get("flags", "").split())


def machine_name(device: str = "cpu") -> str:
    """'NVIDIA H100 80GB HBM3' or 'AMD EPYC (x86_64, AVX2, no VNNI), 2 cores, 2 threads, fp32'.

    CPU figures depend on the instruction set more than on the core count: native bf16 (AMX or
    AVX512-BF16) trains about 3x faster than fp32, and int8 inference needs VNNI to gain much.
    """
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    from cifar.engine import native_bf16

    model, flags = _cpu_model_and_flags()
    vnni = "VNNI" if flags & {"avx512_vnni", "avx_vnni", "amx_int8"} else "no VNNI"
    matrix = ", AMX" if "amx_bf16" in flags else ""  # the two native-bf16 kinds differ in speed
    isa = f"{platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, {vnni}{matrix}"
    precision = "native bf16" if native_bf16(torch.device("cpu")) else "fp32"
    return f"{model} ({isa}), {os.cpu_count()} cores, {torch.get_num_threads()} threads, {precision}"


def record(benchmark: str, lines: list[str], *, write: bool = True) -> None:
    """Print the figures and append them to RESULTS.md under today's date (table rows as they are)."""
    for line in lines:
        print(line)
    if write:
        body = "".join(f"{line}\n" if not line or line.startswith("|") else f"- {line}\n" for line in lines)
        with open(RESULTS, "a") as f:
            f.write(f"\n#### {date.today()} {benchmark}\n\n{body}")


def extract_imagefolder(archive: Path, dest: Path, split: str = "train", per_class: int = 0) -> Path:
    """Extract ``<root>/<split>/<class>/*.jpg`` from the JPEG archive (the first ``per_class`` of each)."""
    counts: dict[str, int] = {}
    with tarfile.open(archive) as tar:
        members = []
        for m in tar:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) < 4 or parts[-3] != split:
                continue
            cls = parts[-2]
            if per_class and counts.get(cls, 0) >= per_class:
                continue
            counts[cls] = counts.get(cls, 0) + 1
            members.append(m)
        tar.extractall(dest, members=members, filter="data")
    return next(dest.rglob(split))
