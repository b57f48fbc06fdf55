"""Acceptance: the project's example suite, unchanged, on the transformers engine.

A tiny random-weight Llama (2 layers, hidden size 64, vocabulary 1,024; seeded, built
from a config JSON, nothing downloaded) on the CPU under the cpu profile: the same
floors and SLOs gate it as the embedded engine, the rack-only tests skip, and every
result names the engine, model and versions it ran on. A subprocess run: torch cannot
be imported twice in one process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the transformers extra (torch) is not installed")
pytest.importorskip("transformers", reason="the transformers extra is not installed")

from pytest_tokperf.engines.transformers import PRESETS

EXAMPLES = Path(__file__).parent.parent.parent / "examples"


def test_the_examples_pass_on_a_tiny_random_weight_llama(pytester: pytest.Pytester) -> None:
    shutil.copytree(EXAMPLES, pytester.path / "examples")
    (pytester.path / "tiny-llama.json").write_text(json.dumps(PRESETS["tiny"]))
    result = pytester.runpytest_subprocess(
        "examples",
        "--tokperf-profile", "cpu",
        "--tokperf-engine", "transformers",
        "--tokperf-model-path", "tiny-llama.json",
        "--tokperf-json", "out.json",
        "-p", "no:cacheprovider",
        "-rs",
    )  # fmt: skip
    # rack-only floors, the MLPerf SLO tests and the sim-only request-rate capacity test skip
    # on the cpu profile; the closed-loop capacity test runs
    result.assert_outcomes(passed=9, skipped=5)
    doc = json.loads((pytester.path / "out.json").read_text())
    measured = [t for t in doc["tests"] if t["verdict"] != "SKIPPED"]
    # the release gate only measures without a baseline to compare with
    assert [t["nodeid"] for t in measured if t["verdict"] == "MEASURED"] == [
        "examples/test_release_gate.py::test_offline_throughput_against_baseline"
    ]
    assert {t["verdict"] for t in measured} == {"PASS", "MEASURED"}
    assert len(measured) == 8  # every example that applies to the cpu profile
    for t in measured:
        engine = t["engine"]
        assert engine["backend"] == "transformers"
        assert engine["model"] == "tiny-llama llama (random weights, 0.2M parameters)"
        assert engine["settings"]["device"] == "cpu" and engine["devices"] == 1
        assert {"torch", "transformers"} <= set(engine["versions"])
    offline = next(t for t in measured if t["nodeid"].endswith("test_offline_throughput_per_gpu"))
    # random weights ignore EOS: 16 requests of the profile's full 64 tokens
    assert offline["requests"] == 16 and offline["output_tokens"] == 16 * 64
