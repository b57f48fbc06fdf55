"""Accuracy parity through pytest (pytester) on the real embedded model at two precisions."""

from __future__ import annotations

import json

import pytest

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
pytest.importorskip("llama_cpp", reason="needs the 'embedded' extra")

# small runs: 8 samples (the fewest a parity verdict takes) of at most 12 new tokens each;
# a ROUGE ratio of 0.5 lets the 8-bit model pass and still fails the 4-bit one
SUITE = """
import pytest

@pytest.mark.accuracy_parity(reference="f16", rouge_ratio=0.5)
def test_against_references(tokperf):
    result = tokperf.accuracy(samples=8, max_tokens=12)
    assert result.mode == "dataset" and len(result.samples) == 8

def test_reference_fixture(tokperf_reference_engine, tokperf):
    # the profile's reference precision, and the very engine tokperf.accuracy() compares with
    assert tokperf_reference_engine.info.precision == "f16"
    assert tokperf.reference("f16") is tokperf_reference_engine
    tokperf.accuracy(samples=1, max_tokens=4)  # no marker: reported, not gated

@pytest.mark.accuracy_parity(max_kl=0.1, min_top1=0.8, rouge_ratio=0.5, dataset="questions.jsonl")
def test_against_reference_outputs(tokperf):
    tokperf.accuracy(samples=8, max_tokens=12)
"""
QUESTIONS = "\n".join(
    json.dumps({"id": f"q{i}", "prompt": p})
    for i, p in enumerate(
        [
            "Name three primary colours.",
            "Why is the sky blue? Answer briefly.",
            "Write one sentence about the sea.",
            "What is two plus three?",
            "Name a large animal that lives in the ocean.",
            "What do bees make?",
            "Give one word that rhymes with cat.",
            "Which planet do we live on?",
        ]
    )
)
SMALL = ("-p", "no:cacheprovider", "--tokperf-json", "out.json")


def _run(pytester: pytest.Pytester, precision: str) -> tuple[pytest.RunResult, dict]:
    pytester.makepyfile(test_gate=SUITE)
    pytester.makefile(".jsonl", questions=QUESTIONS)
    result = pytester.runpytest(*SMALL, "--tokperf-precision", precision)
    doc = json.loads((pytester.path / "out.json").read_text())
    return result, {t["nodeid"].split("::")[1]: t for t in doc["tests"]}


def _direct_rouge(sample: dict) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = scorer.score(sample["target"], sample["output"])
    return {k: 100 * v.fmeasure for k, v in scores.items()}


def test_q8_0_against_f16_passes_on_direct_rouge_scores(pytester: pytest.Pytester) -> None:
    result, tests = _run(pytester, "q8_0")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "*= tokperf =*",
            "parity test * precision * samples * ROUGE-1 * ROUGE-2 * ROUGE-L * tokens * KL "
            "* top-1 * verdict",
            "test_gate.py::test_against_reference_outputs * q8_0 vs f16 * 8 * PASS",
        ]
    )
    refs = tests["test_against_references"]
    assert (refs["verdict"], refs["status"], refs["mode"]) == ("PASS", "PASS", "dataset")
    assert (refs["precision"], refs["reference_precision"]) == ("q8_0", "f16")
    s = refs["scores"]
    # the scores are direct rouge_score numbers of the texts in the JSON
    direct = [_direct_rouge(p) for p in refs["per_sample"]]
    for key in ("rouge1", "rouge2", "rougeL"):
        assert s[key] == pytest.approx(sum(d[key] for d in direct) / 8)
    # every gated metric is a check of the test's one judgment, with its interval
    gated = {c["metric"]: c for c in refs["checks"] if c["kind"] == "parity"}
    assert set(gated) == {"rouge1", "rouge2", "rougeL", "tokens_per_sample"}
    assert all(c["status"] == "PASS" and c["ci_low"] >= c["limit"] for c in gated.values()
               if c["metric"] != "tokens_per_sample")  # fmt: skip
    assert refs["settings"]["max_tokens"] == 12 and refs["settings"]["decoding"] == "greedy"
    assert refs["settings"]["chat_template"].startswith("gguf tokenizer.chat_template")
    assert refs["engine"]["settings"]["model_path"].endswith("SmolLM2-135M-Instruct.Q8_0.gguf")
    agree = tests["test_against_reference_outputs"]
    assert agree["mode"] == "agreement" and 0 < agree["scores"]["kl"] < 0.1
    assert agree["scores"]["top1"] >= 0.8
    measured = tests["test_reference_fixture"]
    assert (measured["verdict"], measured["samples"]) == ("MEASURED", 1)
    assert all(p["target"] == p["reference_output"] for p in agree["per_sample"])


def test_q4_0_against_f16_fails(pytester: pytest.Pytester) -> None:
    result, tests = _run(pytester, "q4_0")
    result.assert_outcomes(passed=1, failed=2)
    agree = tests["test_against_reference_outputs"]
    assert agree["verdict"] == "FAIL" and agree["precision"] == "q4_0"
    s = agree["scores"]
    # the 4-bit model's answers drift from F16's: KL above the limit
    assert s["kl"] > 0.1 and s["exact_match"] < 1.0
    checks = {c["metric"]: c for c in agree["parity_checks"]}
    assert checks["kl"]["status"] == "FAIL" and checks["kl"]["low"] > 0.1
    assert checks["rougeL"]["observed"] == pytest.approx(s["rougeL"] / 100)
    assert checks["rougeL"]["low"] <= checks["rougeL"]["observed"] <= checks["rougeL"]["high"]
    # agreement scores are direct rouge_score numbers against F16's own outputs
    direct = [_direct_rouge(p) for p in agree["per_sample"]]
    assert s["rougeL"] == pytest.approx(sum(d["rougeL"] for d in direct) / 8)
    worst = min(agree["per_sample"], key=lambda p: p["rouge"]["rougeL"])
    text = result.stdout.str()
    assert f"  {worst['id']}: ROUGE-L " in text
    assert (
        "mean KL divergence {:.4f} nats (95% CI {:.3f}-{:.3f}) > limit 0.1000 "
        "[profile cpu, engine llamacpp, model SmolLM2-135M-Instruct q4_0 vs f16, "
        "dataset questions.jsonl, 8 samples, scored against reference outputs]".format(
            checks["kl"]["observed"], checks["kl"]["low"], checks["kl"]["high"]
        )
        in text
    )
    assert "  worst samples (ROUGE-L, reference excerpt, output excerpt):" in text
    refs = tests["test_against_references"]
    assert refs["verdict"] in ("FAIL", "INCONCLUSIVE") and refs["scores"]["reference_rouge1"] > 0


def test_bad_markers_and_precisions_are_usage_errors(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        test_bad="""
        import pytest

        @pytest.mark.accuracy_parity(rouge_ratio=99)
        def test_percent_not_fraction(tokperf):
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: test_bad.py::test_percent_not_fraction: accuracy_parity(rouge_ratio=...) "
            "must be a number in (0, 1], got 99"
        ]
    )
    monkeypatch.setenv("TOKPERF_PRECISION", "fp4")
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: environment variable TOKPERF_PRECISION: unknown precision 'fp4' for the "
            "llamacpp engine; available: q4_1, f16, q8_0, q4_0"
        ]
    )


BOTH = """
import pytest

@pytest.mark.throughput_floor(per_gpu=0.01)
@pytest.mark.accuracy_parity(reference="f16", max_kl=1e-9, rouge_ratio=0.1)
def test_fast_but_unfaithful(tokperf):
    tokperf.run(requests=10, max_tokens=4)
    tokperf.accuracy(samples=8, max_tokens=6)
"""


def test_a_test_with_a_floor_and_parity_is_judged_on_both(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_both=BOTH)
    result = pytester.runpytest(*SMALL, "--tokperf-precision", "q8_0")
    result.assert_outcomes(failed=1)  # its floor passes; its KL cannot be 1e-9
    (test,) = json.loads((pytester.path / "out.json").read_text())["tests"]
    assert test["verdict"] == "FAIL" and test["parity"]["precision"] == "q8_0"
    kinds = {(c["kind"], c["metric"]): c["status"] for c in test["checks"]}
    assert kinds[("floor", "per_gpu")] in ("PASS", "INCONCLUSIVE")
    assert kinds[("parity", "kl")] == "FAIL"
    result.stdout.fnmatch_lines(
        [
            "*mean KL divergence * nats (95% CI *) > limit 0.0000 [[]profile cpu*",
            "test_both.py::test_fast_but_unfaithful * q8_0 vs f16 * 8 * FAIL",
        ]
    )
