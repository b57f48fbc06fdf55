"""Accuracy parity math: ROUGE, divergence, KL, bootstrap, the decision rule (pure)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_tokperf import accuracy, markers
from pytest_tokperf.accuracy import ParitySpec, Sample

np = pytest.importorskip("numpy")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")


def test_rouge_agrees_with_a_direct_rouge_score_computation() -> None:
    preds = [
        "  The cats were sitting on the mat. Then they ran away!  ",
        "Paris is the capital of France.",
        "",
    ]
    targets = ["A cat sat on the mat. It ran off.", "The capital of France is Paris.", "Nothing."]
    ours = accuracy.rouge(preds, targets)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for got, pred, target in zip(ours, preds, targets, strict=True):
        # MLPerf's preprocessing written out by hand: strip, one sentence a line
        split_p = pred.strip().replace(". ", ".\n").replace("! ", "!\n")
        split_t = target.strip().replace(". ", ".\n")
        direct = scorer.score(split_t, split_p)
        for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            assert got[key] == pytest.approx(100 * direct[key].fmeasure)
        # ROUGE-1/2/L do not depend on the sentence split; only Lsum does
        plain = scorer.score(target, pred)
        for key in ("rouge1", "rouge2", "rougeL"):
            assert got[key] == pytest.approx(100 * plain[key].fmeasure)


def test_rouge1_by_hand_with_the_porter_stemmer() -> None:
    # Porter: cats -> cat, sitting -> sit, sits -> sit: 4 of the 5 prediction unigrams
    # (the, cat, are, sit, here) match all 4 target ones (the, cat, sit, here)
    (got,) = accuracy.rouge(["the cats are sitting here"], ["the cat sits here"])
    precision, recall = 4 / 5, 4 / 4
    assert got["rouge1"] == pytest.approx(100 * 2 * precision * recall / (precision + recall))


def test_sentence_split_is_one_sentence_a_line() -> None:
    assert accuracy.sentence_split("  One. Two!  Three? four ") == "One.\nTwo!\nThree?\nfour"
    assert accuracy.sentence_split("3.14 is pi") == "3.14 is pi"  # no space after the dot


def test_rouge_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        accuracy.rouge(["a", "b"], ["a"])


@pytest.mark.parametrize(
    ("test", "ref", "expected"),
    [
        ((1, 2, 3), (1, 2, 3), None),
        ((1, 2, 3), (1, 5, 3), 1),
        ((9,), (1,), 0),
        ((1, 2), (1, 2, 3), 2),  # one stopped early
        ((), (), None),
    ],
)
def test_first_divergence(
    test: tuple[int, ...], ref: tuple[int, ...], expected: int | None
) -> None:
    assert accuracy.first_divergence(test, ref) == expected


def test_token_parity_against_a_hand_computed_kl() -> None:
    ref = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], dtype=np.float32)
    test = np.array([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]], dtype=np.float32)

    def softmax(row: list[float]) -> list[float]:
        e = [math.exp(x) for x in row]
        return [x / sum(e) for x in e]

    expected = 0.0
    for r, t in zip(ref.tolist(), test.tolist(), strict=True):
        p, q = softmax(r), softmax(t)
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    kl, agree, n = accuracy.token_parity(ref, test)
    assert kl == pytest.approx(expected, rel=1e-6)
    # argmax ties go to the first index: row 0 agrees (0 vs 0), row 1 does not (0 vs 1)
    assert (agree, n) == (1, 2)
    assert accuracy.token_parity(ref, ref)[:2] == (pytest.approx(0.0, abs=1e-9), 2)


def test_token_parity_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        accuracy.token_parity(np.zeros((2, 3)), np.zeros((3, 3)))


@pytest.mark.parametrize(
    ("low", "high", "minimum", "maximum", "expected"),
    [
        (0.995, 1.0, 0.99, None, "PASS"),
        (0.99, 1.0, 0.99, None, "PASS"),  # the bound itself clears it
        (0.95, 0.98, 0.99, None, "FAIL"),
        (0.98, 1.01, 0.99, None, "INCONCLUSIVE"),
        (0.95, 1.05, 0.9, 1.1, "PASS"),
        (1.12, 1.3, 0.9, 1.1, "FAIL"),
        (0.5, 0.85, 0.9, 1.1, "FAIL"),
        (1.0, 1.2, 0.9, 1.1, "INCONCLUSIVE"),
        (0.01, 0.02, None, 0.05, "PASS"),
        (0.06, 0.07, None, 0.05, "FAIL"),
    ],
)
def test_decide(
    low: float, high: float, minimum: float | None, maximum: float | None, expected: str
) -> None:
    assert accuracy.decide(low, high, minimum, maximum) == expected


def test_inconclusive_does_not_pass_the_gate() -> None:
    assert accuracy.gate("PASS") and not accuracy.gate("FAIL")
    assert not accuracy.gate("INCONCLUSIVE")


@given(
    st.lists(st.floats(0.1, 100.0), min_size=1, max_size=30),
    st.floats(0.1, 2.0),
    st.integers(0, 1000),
)
def test_bootstrap_of_a_constant_ratio_is_that_ratio(
    ref: list[float], scale: float, seed: int
) -> None:
    test = [scale * r for r in ref]
    ci = accuracy.bootstrap(len(ref), accuracy._ratio(test, ref), resamples=50, seed=seed)
    assert ci.value == pytest.approx(scale)
    assert ci.low == pytest.approx(scale) and ci.high == pytest.approx(scale)


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    test = [30.0, 10.0, 25.0, 5.0, 40.0, 12.0, 33.0, 20.0]
    ref = [32.0, 20.0, 24.0, 15.0, 41.0, 10.0, 35.0, 30.0]
    stat = accuracy._ratio(test, ref)
    a = accuracy.bootstrap(len(ref), stat, seed=7)
    b = accuracy.bootstrap(len(ref), stat, seed=7)
    assert a == b
    assert a.value == pytest.approx(sum(test) / sum(ref))
    assert a.low < a.value < a.high
    # every resampled ratio lies between the smallest and largest per-sample ratio
    ratios = [t / r for t, r in zip(test, ref, strict=True)]
    assert min(ratios) <= a.low and a.high <= max(ratios)


def _sample(
    i: int, test_r1: float, ref_r1: float, tokens: int = 10, ref_tokens: int = 10
) -> Sample:
    def scores(x: float) -> dict[str, float]:
        return dict.fromkeys(accuracy.ROUGE_KEYS, x)

    return Sample(
        id=f"s{i}",
        target="t",
        reference_output="r",
        output="o",
        reference_tokens=ref_tokens,
        tokens=tokens,
        first_divergence=None if test_r1 == ref_r1 else 0,
        test_rouge=scores(test_r1),
        reference_rouge=scores(ref_r1),
        kl_sum=0.1 * i,
        top1_agree=9,
        positions=10,
    )


def test_score_identical_engines_pass() -> None:
    samples = [_sample(i, 20.0 + i, 20.0 + i) for i in range(8)]
    scores, checks, status = accuracy.score(samples, ParitySpec())
    assert status == "PASS"
    assert [c.metric for c in checks] == ["rouge1", "rouge2", "rougeL", "tokens_per_sample"]
    assert scores["rouge1_ratio"] == 1.0 and scores["exact_match"] == 1.0
    assert scores["rouge1"] == pytest.approx(sum(20.0 + i for i in range(8)) / 8)
    assert scores["mean_first_divergence"] is None


def test_score_a_clear_loss_fails_with_the_reference_value() -> None:
    samples = [_sample(i, 15.0 + i, 30.0 + i, tokens=12) for i in range(8)]
    spec = ParitySpec(max_kl=0.01, min_top1=0.95)
    scores, checks, status = accuracy.score(samples, spec)
    assert status == "FAIL"
    by = {c.metric: c for c in checks}
    expected = sum(15.0 + i for i in range(8)) / sum(30.0 + i for i in range(8))
    assert by["rouge1"].observed == pytest.approx(expected) and by["rouge1"].status == "FAIL"
    assert by["rouge1"].reference == pytest.approx(sum(30.0 + i for i in range(8)) / 8)
    assert by["tokens_per_sample"].observed == pytest.approx(1.2)
    assert by["tokens_per_sample"].status == "FAIL"
    # KL: sum of 0.1*i over 8 samples of 10 positions each
    assert by["kl"].observed == pytest.approx(sum(0.1 * i for i in range(8)) / 80)
    assert by["kl"].status == "FAIL"
    assert by["top1"].observed == pytest.approx(0.9) and by["top1"].status == "FAIL"
    assert scores["exact_match"] == 0.0 and scores["mean_first_divergence"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rouge_ratio": 1.5}, r"rouge_ratio=...\) must be a number in \(0, 1\], got 1.5"),
        ({"rouge_ratio": "0.99"}, "rouge_ratio"),
        ({"tokens_per_sample": (1.1, 0.9)}, r"tokens_per_sample=...\) must be \(low, high\)"),
        ({"tokens_per_sample": 0.9}, "tokens_per_sample"),
        ({"max_kl": -1}, r"max_kl=...\) must be a positive number"),
        ({"min_top1": 2}, "min_top1"),
        ({"reference": "bf17"}, r"reference='bf17'\): expected one of q4_1, f16"),
        ({"refrence": "f16"}, "unknown keywords refrence"),
        ({"dataset": 3}, r"dataset=...\) must be"),
    ],
)
def test_marker_errors_name_the_test(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(pytest.UsageError, match=message) as info:
        markers.parse_parity_marker((), kwargs, "t.py::test_x", ("q4_1", "f16"))
    assert str(info.value).startswith("t.py::test_x: ")


def test_marker_defaults_and_positional_arguments() -> None:
    spec = markers.parse_parity_marker((), {}, "t.py::test_x", None)
    assert spec == ParitySpec()
    assert markers.parse_parity_marker((), {"reference": "bf16"}, "w", None).reference == "bf16"
    with pytest.raises(pytest.UsageError, match="positional arguments"):
        markers.parse_parity_marker(("f16",), {}, "w", None)
