"""Parity payloads, failure messages and the terminal table from synthetic results."""

from __future__ import annotations

import json

from pytest_tokperf import accuracy, report
from pytest_tokperf.accuracy import ParityResult, ParitySpec, Sample
from pytest_tokperf.profiles import BUILTIN


def _sample(i: int, test: float, ref: float) -> Sample:
    return Sample(
        id=f"s{i}",
        target=f"reference answer number {i} " * 5,
        reference_output="ref out",
        output=f"output {i}",
        reference_tokens=10,
        tokens=10,
        first_divergence=None if test == ref else 3,
        test_rouge=dict.fromkeys(accuracy.ROUGE_KEYS, test),
        reference_rouge=dict.fromkeys(accuracy.ROUGE_KEYS, ref),
    )


def _result(samples: list[Sample], status_spec: ParitySpec) -> ParityResult:
    scores, checks, status = accuracy.score(samples, status_spec)
    return ParityResult(
        mode="dataset",
        dataset="default",
        reference_precision="f16",
        precision="q4_0",
        settings={"decoding": "greedy", "max_tokens": 16, "seed": 0},
        samples=tuple(samples),
        scores=scores,
        checks=checks,
        status=status,
        engine={"backend": "llamacpp", "model": "SmolLM2-135M-Instruct", "precision": "q4_0"},
        reference_engine={"backend": "llamacpp", "precision": "f16"},
    )


def test_a_failing_parity_message_names_metric_limit_reference_and_worst_samples() -> None:
    samples = [_sample(i, 10.0 + i, 40.0 - i) for i in range(8)]
    result = _result(samples, ParitySpec())
    data = report.parity_payload("t.py::test_p", result, BUILTIN["cpu"])
    json.dumps(data)  # plain JSON data
    assert (data["verdict"], data["status"], data["kind"]) == ("FAIL", "FAIL", "accuracy_parity")
    lines = report.parity_message(data).splitlines()
    ratio = sum(10.0 + i for i in range(8)) / sum(40.0 - i for i in range(8))
    ref = sum(40.0 - i for i in range(8)) / 8
    check = next(c for c in data["parity_checks"] if c["metric"] == "rouge1")
    judged = next(c for c in data["checks"] if c["metric"] == "rouge1")
    assert (judged["kind"], judged["status"], judged["ci_low"]) == ("parity", "FAIL", check["low"])
    assert lines[0] == (
        f"ROUGE-1 ratio {ratio:.3f} (95% CI {check['low']:.3f}-{check['high']:.3f}) < required "
        f"0.990 x reference {report.num(ref)} [profile cpu, engine llamacpp, model "
        "SmolLM2-135M-Instruct q4_0 vs f16, dataset default, 8 samples, scored against "
        "dataset references]"
    )
    assert lines[3] == "  worst samples (ROUGE-L, reference excerpt, output excerpt):"
    # worst: largest drop, s0 (10 vs 40), then s1, s2
    assert lines[4].startswith("  s0: ROUGE-L 10 vs 40, reference 'reference answer number 0")
    assert lines[4].endswith("output 'output 0'")
    assert [line.split(":")[0] for line in lines[5:]] == ["  s1", "  s2"]


def test_inconclusive_is_labelled_and_fails_the_gate() -> None:
    # half the samples lose a lot, half gain: the interval straddles 0.99
    samples = [_sample(i, 10.0 if i % 2 else 60.0, 30.0) for i in range(8)]
    result = _result(samples, ParitySpec())
    assert result.status == "INCONCLUSIVE" and not result.passed
    data = report.parity_payload("t.py::test_p", result, BUILTIN["cpu"])
    assert data["verdict"] == "INCONCLUSIVE"  # the --tokperf-inconclusive policy decides
    assert report.parity_message(data).startswith(
        "INCONCLUSIVE: ROUGE-1 ratio 1.167 (95% CI "  # (4 x 60 + 4 x 10) / (8 x 30)
    )
    assert "straddles required 0.990 x reference 30 [profile cpu" in report.parity_message(data)
    table = report.parity_table([data])
    assert table[1].split()[-1] == "INCONCLUSIVE"
    assert table[1].split()[1:4] == ["q4_0", "vs", "f16"]
