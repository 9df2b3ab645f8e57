"""Generated bad input (issue #30): every case ends accepted (and valid) or in one of our errors naming
the bad value, never in a raw library traceback, and nothing is written. A few hundred seeded cases;
``python -m benchmarks.faults --fuzz 1000`` runs a thousand per target (``benchmarks/fuzz.py``)."""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis")

from benchmarks.fuzz import TARGETS, check_error  # noqa: E402

CASES = {"rows": 200, "files": 200, "choices": 200, "config": 200, "cli": 100}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_generated_bad_input_ends_in_our_error(target):
    assert TARGETS[target](CASES[target], seed=0) == CASES[target]


def test_the_check_tells_our_errors_from_a_library_traceback():
    import json

    try:
        json.loads("{")
    except ValueError as error:
        assert "not by pyro_monteclora" in check_error(error, ["line"])
    from pyro_monteclora import MonteCLoRAConfig

    try:
        MonteCLoRAConfig(lora_dropout="x")
    except ValueError as error:
        assert check_error(error, ["lora_dropout"]) is None
        assert "names none of" in check_error(error, ["seed"])
