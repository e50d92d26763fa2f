"""RESULTS.md from the records (results/*.jsonl): the latest figures of each benchmark on each kind of machine.

python benchmarks/results.py [--check]   # --check: exit 1 if RESULTS.md is not what the records make
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECORDS, RESULTS, MAX_ROWS = HERE / "results", HERE / "RESULTS.md", 40
KINDS = {  # the CPU kinds of harness.machine_kind, as the records' machines were; a GPU's kind is its name
    "AMX": 'Intel Xeon with AMX-BF16 and AVX512-BF16 (lscpu "Intel(R) Xeon(R) Processor", family 6 model 167)',
    "Zen 5 bf16": "AMD EPYC, Zen 5 (family 26), with AVX512-BF16 and VNNI, no AMX",
    "Zen 4 bf16": "AMD EPYC, Zen 4 (family 25 model 17), with AVX512-BF16 and VNNI, no AMX",
    "AVX512 bf16": "another CPU with AVX512-BF16",
    "AVX512 fp32": "a CPU with AVX512 but no native bf16",
    "AVX2 fp32": "AMD EPYC with AVX2 only (no VNNI)",
}
NOT_MEASURED = {"peer_airbench": "python benchmarks/peer_airbench.py --seeds 5"}  # wanted on a GPU: a row until then


def kind_order(kind: str) -> tuple:
    """CPU kinds as in KINDS, then the GPUs (and any other kind) by name."""
    return (0, list(KINDS).index(kind), "") if kind in KINDS else (1, 0, kind)


def load(folder: Path = RECORDS) -> list[dict]:
    """Every record, file by file, each file's in the order appended."""
    return [json.loads(line) for path in sorted(folder.glob("*.jsonl")) for line in path.read_text().splitlines()]


def current(records: list[dict]) -> list[dict]:
    """The latest record of each (benchmark, machine kind): the latest date, then the last appended."""
    latest: dict[tuple[str, str], dict] = {}
    for r in records:
        if r["date"] >= latest.get((r["benchmark"], r["machine_kind"]), {"date": ""})["date"]:
            latest[r["benchmark"], r["machine_kind"]] = r
    rows = sorted(latest.values(), key=lambda r: r["date"])[len(NOT_MEASURED) - MAX_ROWS :]  # the most recent
    return sorted(rows, key=lambda r: (r["benchmark"], kind_order(r["machine_kind"])))


def show(value) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value).replace("|", "\\|")
    return f"{value:,}" if isinstance(value, int) else f"{value:,.6g}"


def render(records: list[dict]) -> str:
    rows = current(records)
    gpu = [r for r in records if r["machine_kind"] not in KINDS and not r["machine_kind"].endswith(" fp32")]
    lines = [
        "# Measured results\n",
        "Made by `python benchmarks/results.py` from `benchmarks/results/*.jsonl`, the records the benchmarks append",
        "(one JSON line per measurement): edit neither by hand; `--check` says whether this file is current. One row",
        "per benchmark and kind of machine, its latest record. Earlier measurements and how to read them: [the dated",
        "log](../docs/results-log.md). Accuracy is on the test split of the JPEG copy of CIFAR-10",
        "(`../shared/data/cifar10-jpeg.tar.gz`); `s` are seconds. The CPUs have 2 cores; the kinds of machine:\n",
        *(f"- **{k}**: {KINDS.get(k, 'a GPU')}" for k in sorted({r["machine_kind"] for r in rows}, key=kind_order)),
        f"\nThe latest GPU figures are from {max((r['date'] for r in gpu), default='no date')}.\n",
        "| benchmark | machine kind | figures | date | commit | command |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['benchmark']} | {r['machine_kind']} | "
            + "; ".join(f"{k}: {show(v)}" for k, v in r["figures"].items())
            + f" | {r['date']} | {r['commit']} | `{show(r['command'])}` |"
            for r in rows
        ),
        *(
            f"| {name} | GPU | not measured | - | - | `{command}` |"
            for name, command in NOT_MEASURED.items()
            if not any(r["benchmark"].split(".")[0] == name for r in gpu)
        ),
    ]
    return "\n".join(lines) + "\n"


def write(folder: Path = RECORDS, out: Path = RESULTS) -> None:
    out.write_text(render(load(folder)))


if __name__ == "__main__":
    if sys.argv[1:] == []:
        write()
    elif sys.argv[1:] != ["--check"]:
        sys.exit(__doc__)
    elif not RESULTS.exists() or RESULTS.read_text() != render(load()):
        sys.exit(f"{RESULTS} is stale: `python benchmarks/results.py` makes it from the records")
