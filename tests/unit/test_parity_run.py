"""run_parity on fake engines: the orchestration, both ROUGE modes, missing logits."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from pytest_tokperf import accuracy, runner
from pytest_tokperf.engines import Chunk, EngineInfo, Request
from pytest_tokperf.workloads import Prompt, Workload

pytest.importorskip("rouge_score")


class Canned:
    """Answers each prompt with fixed words, one token per word (no logits)."""

    def __init__(self, answers: dict[str, str], precision: str) -> None:
        self.answers = answers
        self.info = EngineInfo("fake", "m", precision, 1, settings={"decoding": "greedy"})

    async def stream(self, request: Request) -> AsyncIterator[Chunk]:
        words = self.answers[request.prompt].split()[: request.max_tokens]
        for w in words:
            yield Chunk(1, w + " ", (hash(w) % 1000,))

    async def aclose(self) -> None:
        pass


PROMPTS = (Prompt("a", "pa", reference="the cat sat"), Prompt("b", "pb", reference="a dog ran"))


def _run(test: Canned, ref: Canned, spec: accuracy.ParitySpec, prompts=PROMPTS):
    return runner.run_parity(
        test,
        ref,
        Workload("w", prompts),
        samples=16,
        max_tokens=None,
        default_max_tokens=16,
        spec=spec,
        reference_precision="f16",
    )


def test_dataset_mode_scores_both_engines_against_the_references() -> None:
    ref = Canned({"pa": "the cat sat", "pb": "a dog ran"}, "f16")
    test = Canned({"pa": "the cat sat", "pb": "a cat ran"}, "q4_0")
    result = _run(test, ref, accuracy.ParitySpec())
    assert result.mode == "dataset" and len(result.samples) == 2  # samples capped at the set
    assert result.scores["reference_rouge1"] == pytest.approx(100.0)
    # "a cat ran" vs "a dog ran": 2 of 3 unigrams -> F1 2/3
    assert result.scores["rouge1"] == pytest.approx((100.0 + 200 / 3) / 2)
    assert result.scores["exact_match"] == 0.5 and result.scores["kl"] is None
    assert result.settings["distribution"] == "not supported by these engines"
    assert result.settings["max_tokens"] == 16
    # two samples: a resample of sample "a" twice has ratio 1, so the interval straddles 0.99
    assert result.status == "INCONCLUSIVE" and not result.passed
    assert [s.first_divergence for s in result.samples] == [None, 1]


def test_agreement_mode_without_references_and_identical_answers_pass() -> None:
    prompts = tuple(Prompt(f"{i}", f"p{i}") for i in range(accuracy.MIN_SAMPLES))
    answers = {p.prompt: f"answer number {p.id} here" for p in prompts}
    ref, test = Canned(answers, "f16"), Canned(answers, "q8_0")
    result = _run(test, ref, accuracy.ParitySpec(), prompts)
    assert result.mode == "agreement" and result.status == "PASS"
    assert result.scores["rougeL"] == 100.0 and result.scores["rougeL_ratio"] == 1.0
    assert [s.target for s in result.samples][:2] == [f"answer number {i} here " for i in (0, 1)]
    # one sample fewer than the minimum: the same answers decide nothing
    fewer = _run(test, ref, accuracy.ParitySpec(), prompts[:-1])
    assert fewer.status == "INCONCLUSIVE" and {c.status for c in fewer.checks} == {"INCONCLUSIVE"}


def test_an_engine_is_never_its_own_reference() -> None:
    ref = Canned({"pa": "one", "pb": "two"}, "f16")
    with pytest.raises(accuracy.ParityError, match="parity would compare it with itself"):
        _run(ref, ref, accuracy.ParitySpec())
    twin = Canned({"pa": "one", "pb": "two"}, "f16")  # another object, the same engine
    with pytest.raises(accuracy.ParityError, match="parity would compare it with itself"):
        _run(twin, ref, accuracy.ParitySpec())


def test_distribution_limits_need_engines_with_logits() -> None:
    ref = Canned({"pa": "x", "pb": "y"}, "f16")
    test = Canned({"pa": "x", "pb": "y"}, "q8_0")
    with pytest.raises(accuracy.ParityError, match="the fake engine does not expose"):
        _run(test, ref, accuracy.ParitySpec(max_kl=0.1))


def test_a_failed_request_is_a_parity_error() -> None:
    ref = Canned({"pa": "x"}, "f16")  # no answer for "pb": the stream raises KeyError
    test = Canned({"pa": "x"}, "q8_0")
    with pytest.raises(
        accuracy.ParityError, match="2 accuracy requests failed; first: b: KeyError"
    ):
        _run(test, ref, accuracy.ParitySpec())
