"""benchmarks/gpu_check.py as a dry run on the CPU: every section runs and lands in the JSON and the markdown;
a budget too small for a section skips it with a note instead of running over."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

KIT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def kit():
    spec = importlib.util.spec_from_file_location("gpu_check", KIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_quick_cpu_dry_run_writes_every_section(tmp_path):
    results = kit().main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_results.json").read_text())
    sections = saved["sections"]
    assert set(sections) == {"correctness", "step_cost", "host_syncs", "generation"}
    assert sections["correctness"]["status"] == "pass" and sections["correctness"]["passed"] > 0
    assert all(row["MemDLM preset"]["median_seconds"] > 0 and row["cost_ratio"] > 1 for row in sections["step_cost"]["rows"])
    assert sections["host_syncs"]["library_counter"] <= sections["host_syncs"]["budget"]
    assert all(rate > 0 for rate in sections["generation"]["tokens_per_second"].values())
    assert results["seconds"] <= results["budget_seconds"]
    assert "| MemDLM preset |" in (tmp_path / "gpu_results.md").read_text()


def test_a_section_the_budget_cannot_hold_is_skipped_with_a_note(tmp_path):
    results = kit().main(["--device", "cpu", "--quick", "--budget", "0.0001", "--out", str(tmp_path),
                          "--sections", "host_syncs", "generation"])
    sections = results["sections"]
    assert sections["correctness"] == {"skipped": "not selected (--sections)"}
    for name in ("host_syncs", "generation"):
        assert "budget left" in sections[name]["skipped"], name
    assert json.loads((tmp_path / "gpu_results.json").read_text())["sections"] == json.loads(json.dumps(sections))
