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
