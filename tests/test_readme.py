"""The README's Python snippets run, in order, as one session (so they cannot rot)."""

from __future__ import annotations

import os
import re

import pytest

from conftest import REPO


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        blocks = re.findall(r"```python\n(.*?)```", handle.read(), flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["metrics"]["mean"]["accuracy"] > 0.7
    assert (tmp_path / "reliability.png").stat().st_size > 1000
    assert (tmp_path / "sentiment" / "adapter_model.safetensors").exists()
    assert namespace["again"].num_extra_parameters() == namespace["result"].model.num_extra_parameters()


#: What libraries print that a user need not act on: transformers' load report and weight-loading
#: and shard-writing bars, datasets' split bars.
LIBRARY_NOISE = ("LOAD REPORT", "Loading weights", "Writing model shards", "Generating train split", "Map:")


@pytest.mark.slow
def test_the_main_job_runs_quietly_and_writes_its_figures(tmp_path):
    """The README's main job (examples/vader_sentiment.py) at a tiny size: its table, its PNGs, its saved
    model, and nothing on stderr from a library (with --no-progress, nothing but Python warnings)."""
    import subprocess
    import sys

    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "vader_sentiment.py"), "--train-size", "96", "--val-size", "48",
         "--test-size", "64", "--epochs", "1", "--num-samples", "2", "--output-dir", str(out), "--save", "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for noise in LIBRARY_NOISE:
        assert noise not in run.stderr, (noise, run.stderr[-3000:])
    # nothing else but Python warnings (a library's deprecation notice in a later version is not ours to hide)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert all("Warning" in line or line.startswith("  ") for line in lines), run.stderr[-3000:]
    for line in ("mean adapter (LoRA)", "mean adapter + temperature", "posterior predictive (S = 2)"):
        assert line in run.stdout
    assert "10% / 20% deferred" in run.stdout and "error AUROC" in run.stdout
    assert (out / "reliability.png").stat().st_size > 1000 and (out / "risk_coverage.png").stat().st_size > 1000
    assert (out / "model" / "model.safetensors").exists()
