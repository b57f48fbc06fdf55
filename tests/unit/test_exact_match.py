"""exact_match needs token ids: text-only engines (openai) report None, not 1.0."""

from __future__ import annotations

import dataclasses

from test_accuracy import _sample  # pytest puts this folder on sys.path (prepend mode)

from pytest_tokperf import accuracy
from pytest_tokperf.accuracy import ParitySpec


def test_exact_match_is_none_when_neither_side_has_token_ids() -> None:
    samples = [dataclasses.replace(_sample(i, 20.0, 20.0), ids_compared=False) for i in range(8)]
    scores, _, status = accuracy.score(samples, ParitySpec())
    assert scores["exact_match"] is None and scores["mean_first_divergence"] is None
    assert status == "PASS"  # ROUGE still decides


def test_exact_match_counts_only_samples_with_token_ids() -> None:
    samples = [_sample(0, 20.0, 20.0), _sample(1, 10.0, 20.0)]
    samples += [dataclasses.replace(_sample(2, 20.0, 20.0), ids_compared=False)]
    scores, _, _ = accuracy.score(samples, ParitySpec())
    assert scores["exact_match"] == 0.5
