"""benchmarks/RESULTS.md is what the records make, and a benchmark's record becomes its current row."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402
import results  # noqa: E402


def test_results_md_is_what_the_records_make():
    records = results.load()
    assert records, "no records in benchmarks/results/"
    assert all(set(r) == set(harness.FIELDS) for r in records)
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == results.render(records), (
        "benchmarks/RESULTS.md is stale: python benchmarks/results.py writes it from benchmarks/results/*.jsonl"
    )
    assert len(results.current(records)) + len(results.NOT_MEASURED) <= results.MAX_ROWS


def test_a_record_has_every_field_and_replaces_the_older_row(tmp_path, capsys):
    kind = harness.machine_kind()
    older = dict(zip(harness.FIELDS, ("demo.quick", kind, "a CPU", {"img/s": 1.0}, [], "2000-01-01", "abc1234", "x")))
    (tmp_path / "demo.jsonl").write_text(json.dumps(older) + "\n")

    entry = harness.record("demo.quick", {"img/s": 1234.5678, "mode": "quick", "images": 60_000}, seeds=range(2),
                           folder=tmp_path, command="python benchmarks/demo.py --quick")  # fmt: skip

    lines = (tmp_path / "demo.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1]) == entry  # appended to the script's file, one JSON line
    assert list(entry) == list(harness.FIELDS)
    assert entry["figures"] == {"img/s": 1235.0, "mode": "quick", "images": 60_000}  # floats keep 4 digits
    assert entry["seeds"] == [0, 1] and entry["date"] == date.today().isoformat()
    assert entry["machine_kind"] == kind and entry["cpu"] == harness.cpu_info()[0]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    assert entry["commit"] == (head.strip() or "unknown")
    assert "img/s: 1235" in capsys.readouterr().out

    # the newest record is the current row; an older one appended after it does not displace it
    late = {**older, "date": "2001-01-01", "figures": {"img/s": 2.0}}
    with open(tmp_path / "demo.jsonl", "a") as f:
        f.write(json.dumps(late) + "\n")
    assert results.current(results.load(tmp_path)) == [entry]
    table = results.render(results.load(tmp_path))
    assert f"| demo.quick | {kind} | img/s: 1,235; mode: quick; images: 60,000 |" in table
    assert "img/s: 2" not in table and "`python benchmarks/demo.py --quick`" in table
