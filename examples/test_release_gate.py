"""Release gate: this build against the previous release's baseline on the same machine.

Absolute floors must sit below the machine's noise (the cpu floor is 5 tokens/s for an
engine that does 40-100); a baseline comparison catches what they let through. Save a
baseline from the release you trust, then compare every candidate with it:

    pytest examples --tokperf-save-baseline .tokperf-baseline          # on the release
    pytest examples --tokperf-compare-baseline .tokperf-baseline       # on the candidate

Without `--tokperf-compare-baseline` the test only measures. A baseline from other
hardware, another profile, model, precision, workload or scenario is never compared.
The 10% tolerance is for the embedded engine on a 2-core shared machine, whose speed
drifts between runs (README: "Baselines and regression verdicts"); `python -m
pytest_tokperf calibrate` measures that drift for your own machine.
"""

from __future__ import annotations

import pytest


@pytest.mark.no_regression(tokens_per_s=0.10)
def test_offline_throughput_against_baseline(tokperf):
    """16 answers of up to 48 tokens: about 10-15 s on 2 idle cores."""
    tokperf.run(scenario="offline", requests=16, max_tokens=48)
