"""benchmarks/continual_omniglot.py end to end on a tiny budget (real Omniglot files): it trains,
resumes, meta-tests and writes the table, the JSON and the plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]


def omniglot_present() -> bool:
    data = os.environ.get("INNERLOOP_DATA")
    return data is not None and (Path(data) / "omniglot" / "images_evaluation.zip").exists()


def test_tiny_benchmark_run_writes_the_results(tmp_path):
    if not omniglot_present():
        pytest.fail("this test needs the Omniglot archives under $INNERLOOP_DATA/omniglot (CI: ../shared/data).")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "results"
    for config, iterations in (("continual_oml.toml", 4), ("continual_pretrain.toml", 6)):
        for _ in range(2):  # the second invocation resumes the finished run and only meta-tests again
            cmd = [sys.executable, str(ROOT / "benchmarks" / "continual_omniglot.py"), "--config",
                   str(ROOT / "configs" / config), "--minutes", "5", "--chunk", "2", "--iterations",
                   str(iterations), "--classes", "5,10", "--seeds", "2", "--lrs", "0.01", "--runs",
                   str(tmp_path / "runs"), "--out",
                   str(out)]
            subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    table = (out / "continual_omniglot.md").read_text()
    assert "OML (innerloop)" in table and "pre-trained baseline" in table and "63.8" in table
    record = json.loads((out / "continual_omniglot_oml.json").read_text())
    assert record["iterations"] == 4 and [r["classes"] for r in record["streams"]] == [5, 10]
    assert (out / "continual_omniglot.png").stat().st_size > 0
    assert (tmp_path / "runs" / "oml" / "last.pt").exists()
