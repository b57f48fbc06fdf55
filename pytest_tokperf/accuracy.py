"""Accuracy parity: does a test engine answer like its reference? Scores and the rule.

ROUGE follows MLPerf Inference's Llama-2-70B accuracy script (mlcommons/inference,
`language/llama2-70b/evaluate-accuracy.py`):
Google's `rouge_score` with the Porter stemmer, mean of per-sample F1 x 100, texts
stripped and split into sentences with newlines first (which only changes
ROUGE-Lsum). MLPerf splits with `nltk.sent_tokenize`, whose punkt model is a separate
download that a test run must not need, so sentences are split here with a regex at
., ! or ? followed by whitespace: the same split for ordinary prose, and ROUGE-1/2/L
do not depend on it at all.

Two ROUGE modes. With dataset references, both engines are scored against the
references and each gated variant must reach `ratio x` the reference engine's score
(MLPerf's rule: 99% of ROUGE-1, ROUGE-2 and ROUGE-L). Without references, the test
engine is scored against the reference engine's own outputs, and those against
themselves (100, but where a score is undefined: ROUGE-2 of a one-word answer is 0), so
the same rule reads "agreement >= ratio x 100" and identical answers agree exactly.

Distribution parity is teacher-forced over the reference engine's outputs: the mean
KL divergence of the test engine's next-token distribution from the reference's and
the top-1 agreement rate, the way llama.cpp's community judges quantizations.

Every gated number is a ratio or mean over samples with a seeded paired bootstrap
confidence interval, judged by `decide`: PASS when the interval clears the limit,
FAIL when it lies wholly on the wrong side, INCONCLUSIVE otherwise.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
GATED_ROUGE = ("rouge1", "rouge2", "rougeL")  # what MLPerf gates; Lsum is reported
RESAMPLES = 1000
CONFIDENCE = 0.95
# below this many samples nothing is decided: the percentile bootstrap's nominal 95%
# interval of a ratio covered the truth 0% (1 sample), 48% (2), 80% (4), 85% (8) and
# 93% (64) of the time on simulated scores (benchmarks/bootstrap_coverage.py)
MIN_SAMPLES = 8
SEED = 0
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class ParityError(RuntimeError):
    """A parity run could not be scored (a request failed); the message says which."""


# --- the decision rule (the same shape as the throughput floors' PASS/FAIL) ---------


def decide(low: float, high: float, minimum: float | None, maximum: float | None) -> str:
    """PASS when the whole interval [low, high] is within the limits, FAIL when it is
    wholly outside one of them, INCONCLUSIVE when it straddles a limit."""
    if (minimum is not None and high < minimum) or (maximum is not None and low > maximum):
        return "FAIL"
    if (minimum is None or low >= minimum) and (maximum is None or high <= maximum):
        return "PASS"
    return "INCONCLUSIVE"


def gate(status: str) -> bool:
    """Whether a status lets the test pass. INCONCLUSIVE does not, until a project-wide
    policy for it exists (kept here, in one place, so it can be swapped)."""
    return status == "PASS"


# --- scores ------------------------------------------------------------------------


def sentence_split(text: str) -> str:
    """MLPerf's preprocessing: strip, then one sentence a line (affects ROUGE-Lsum only)."""
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def rouge(predictions: Sequence[str], targets: Sequence[str]) -> list[dict[str, float]]:
    """Per-sample ROUGE F1 x 100 of each prediction against its target."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    try:
        from rouge_score import rouge_scorer
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "accuracy parity needs the Python module 'rouge_score', which is not installed; "
            "install it with: pip install 'pytest-tokperf[embedded]'"
        ) from None
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    out = []
    for pred, target in zip(predictions, targets, strict=True):
        scores = scorer.score(sentence_split(target), sentence_split(pred))
        out.append({k: 100.0 * scores[k].fmeasure for k in ROUGE_KEYS})
    return out


def first_divergence(test: Sequence[int], reference: Sequence[int]) -> int | None:
    """Index of the first token where two greedy streams differ; None when identical."""
    for i, (a, b) in enumerate(zip(test, reference, strict=False)):
        if a != b:
            return i
    return None if len(test) == len(reference) else min(len(test), len(reference))


def token_parity(reference: np.ndarray, test: np.ndarray) -> tuple[float, int, int]:
    """(sum of KL(reference || test), top-1 agreements, positions) over logit rows."""
    import numpy as np

    if reference.shape != test.shape:
        raise ValueError(f"logits of shape {test.shape} against {reference.shape}")
    if len(reference) == 0:
        return 0.0, 0, 0

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        shifted = x - x.max(axis=1, keepdims=True)
        result: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return result

    lp, lq = log_softmax(reference), log_softmax(test)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=1)
    agree = int((reference.argmax(axis=1) == test.argmax(axis=1)).sum())
    return float(kl.sum()), agree, len(reference)


# --- confidence intervals ----------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float


def bootstrap(
    n: int,
    statistic: Callable[[Sequence[int]], float],
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = SEED,
) -> Interval:
    """Percentile bootstrap of `statistic(indices)` over `n` paired samples.

    Paired: one resample of sample indices feeds both engines' numbers, so what the
    samples share (an easy or a hard prompt) cancels out of a ratio.
    """
    if n < 1:
        raise ValueError("bootstrap of no samples")
    rng = random.Random(seed)
    values = sorted(statistic([rng.randrange(n) for _ in range(n)]) for _ in range(resamples))
    tail = (1.0 - confidence) / 2.0
    low = values[int(tail * (resamples - 1))]
    high = values[int((1.0 - tail) * (resamples - 1) + 0.5)]
    return Interval(statistic(range(n)), low, high)


def _ratio(num: Sequence[float], den: Sequence[float]) -> Callable[[Sequence[int]], float]:
    def statistic(idx: Sequence[int]) -> float:
        bottom = sum(den[i] for i in idx)
        top = sum(num[i] for i in idx)
        if bottom == 0:
            return 1.0 if top == 0 else float("inf")
        return top / bottom

    return statistic


# --- the parity run's inputs and results -------------------------------------------


@dataclass(frozen=True)
class ParitySpec:
    """What a parity test requires (the marker's arguments)."""

    reference: str | None = None  # precision; None: the profile's reference_precision
    rouge_ratio: float = 0.99
    tokens_per_sample: tuple[float, float] = (0.9, 1.1)
    max_kl: float | None = None
    min_top1: float | None = None
    dataset: str | None = None


@dataclass(frozen=True)
class Sample:
    """One prompt's outputs from both engines and its scores."""

    id: str
    target: str  # what the test output was scored against
    reference_output: str
    output: str
    reference_tokens: int
    tokens: int
    first_divergence: int | None
    test_rouge: Mapping[str, float]
    reference_rouge: Mapping[str, float]  # 100s in agreement mode
    kl_sum: float | None = None
    top1_agree: int | None = None
    positions: int | None = None
    # both engines reported token ids (a served model may not): first_divergence means
    # something only then
    ids_compared: bool = True


@dataclass(frozen=True)
class ParityCheck:
    metric: str  # "rouge1", ..., "tokens_per_sample", "kl", "top1"
    observed: float  # the test engine's score (a ratio for ROUGE in dataset mode)
    low: float
    high: float
    minimum: float | None
    maximum: float | None
    reference: float | None  # the reference engine's score behind a ratio
    status: str  # PASS / FAIL / INCONCLUSIVE


@dataclass(frozen=True)
class ParityResult:
    mode: str  # "dataset" (against references) or "agreement" (against the reference engine)
    dataset: str
    reference_precision: str
    precision: str
    settings: Mapping[str, Any]  # greedy, max_tokens, chat template, seed
    samples: tuple[Sample, ...]
    scores: Mapping[str, float | None]  # every score, both engines
    checks: tuple[ParityCheck, ...]
    status: str
    engine: Mapping[str, Any] = field(default_factory=dict)
    reference_engine: Mapping[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return gate(self.status)

    @property
    def failed_checks(self) -> tuple[ParityCheck, ...]:
        return tuple(c for c in self.checks if not gate(c.status))

    def worst(self, n: int = 3) -> list[Sample]:
        """The samples that lost most ROUGE-L against the reference engine."""
        return sorted(
            self.samples, key=lambda s: s.test_rouge["rougeL"] - s.reference_rouge["rougeL"]
        )[:n]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def score(
    samples: Sequence[Sample],
    spec: ParitySpec,
    *,
    seed: int = SEED,
) -> tuple[dict[str, float | None], tuple[ParityCheck, ...], str]:
    """Every score, one check per gated metric, and the overall status."""
    n = len(samples)
    scores: dict[str, float | None] = {}
    checks: list[ParityCheck] = []
    for key in ROUGE_KEYS:
        test = [s.test_rouge[key] for s in samples]
        ref = [s.reference_rouge[key] for s in samples]
        scores[key] = _mean(test)
        scores[f"reference_{key}"] = _mean(ref)
        ci = bootstrap(n, _ratio(test, ref), seed=seed)
        scores[f"{key}_ratio"] = ci.value
        if key in GATED_ROUGE:
            status = decide(ci.low, ci.high, spec.rouge_ratio, None)
            checks.append(
                ParityCheck(
                    key, ci.value, ci.low, ci.high, spec.rouge_ratio, None, _mean(ref), status
                )
            )
    tokens = [float(s.tokens) for s in samples]
    ref_tokens = [float(s.reference_tokens) for s in samples]
    scores["tokens_per_sample"] = _mean(tokens)
    scores["reference_tokens_per_sample"] = _mean(ref_tokens)
    ci = bootstrap(n, _ratio(tokens, ref_tokens), seed=seed)
    scores["tokens_per_sample_ratio"] = ci.value
    lo, hi = spec.tokens_per_sample
    checks.append(
        ParityCheck(
            "tokens_per_sample", ci.value, ci.low, ci.high, lo, hi, _mean(ref_tokens),
            decide(ci.low, ci.high, lo, hi),
        )
    )  # fmt: skip
    # only samples with token ids on both sides can show the tokens were the same
    with_ids = [s for s in samples if s.ids_compared]
    scores["exact_match"] = (
        _mean([1.0 if s.first_divergence is None else 0.0 for s in with_ids]) if with_ids else None
    )
    diverged = [s.first_divergence for s in with_ids if s.first_divergence is not None]
    scores["mean_first_divergence"] = _mean(diverged) if diverged else None
    scored = [s for s in samples if s.positions]
    if scored:
        kl_sums = [s.kl_sum or 0.0 for s in scored]
        agree = [float(s.top1_agree or 0) for s in scored]
        positions = [float(s.positions or 0) for s in scored]
        kl = bootstrap(len(scored), _ratio(kl_sums, positions), seed=seed)
        top1 = bootstrap(len(scored), _ratio(agree, positions), seed=seed)
        scores["kl"], scores["top1"] = kl.value, top1.value
        if spec.max_kl is not None:
            status = decide(kl.low, kl.high, None, spec.max_kl)
            checks.append(
                ParityCheck("kl", kl.value, kl.low, kl.high, None, spec.max_kl, 0.0, status)
            )
        if spec.min_top1 is not None:
            status = decide(top1.low, top1.high, spec.min_top1, None)
            checks.append(
                ParityCheck(
                    "top1", top1.value, top1.low, top1.high, spec.min_top1, None, 1.0, status
                )
            )
    else:
        scores["kl"] = scores["top1"] = None
    if n < MIN_SAMPLES:  # an interval from so few samples decides nothing, either way
        checks = [replace(c, status="INCONCLUSIVE") for c in checks]
    statuses = {c.status for c in checks}
    overall = (
        "FAIL" if "FAIL" in statuses else "INCONCLUSIVE" if "INCONCLUSIVE" in statuses else "PASS"
    )
    return scores, tuple(checks), overall
