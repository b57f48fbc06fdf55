"""The built-in prompt set and JSONL files, with line-numbered errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_tokperf.workloads import WorkloadError, load


def test_builtin_set_has_at_least_48_prompts_with_references() -> None:
    wl = load(None)
    assert wl.name == "default"
    assert len(wl.prompts) >= 48
    assert len({p.id for p in wl.prompts}) == len(wl.prompts)
    assert all(p.reference for p in wl.prompts)
    assert load("default") == wl


def test_requests_cycle_and_override_max_tokens(tmp_path: Path) -> None:
    f = tmp_path / "w.jsonl"
    f.write_text(
        json.dumps({"id": "a", "prompt": "A?", "max_tokens": 5})
        + "\n\n"
        + json.dumps({"id": "b", "prompt": "B?", "reference": "B."})
        + "\n"
    )
    wl = load(f)
    reqs = wl.requests(5, None, 64)
    assert [r.id for r in reqs] == ["a", "b", "a#1", "b#1", "a#2"]
    assert [r.max_tokens for r in reqs] == [5, 64, 5, 64, 5]
    assert {r.max_tokens for r in wl.requests(3, 7, 64)} == {7}
    with pytest.raises(ValueError, match="at least 1"):
        wl.requests(0, None, 64)


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"id": "x"}', "'prompt' must be a non-empty string"),
        ('{"id": "", "prompt": "p"}', "'id' must be a non-empty string"),
        ('{"id": "x", "prompt": "p", "max_tokens": 0}', "positive integer"),
        ('{"id": "x", "prompt": "p", "max_tokens": 1.5}', "positive integer"),
        ('{"id": "x", "prompt": "p", "reference": 3}', "'reference' must be a string"),
        ('{"id": "x", "prompt": "p", "temperature": 1}', "unknown keys temperature"),
        ('{"id": "ok", "prompt": "p"}', "duplicate id 'ok' (first on line 1)"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path: Path, line: str, says: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"id": "ok", "prompt": "p"}\n' + line + "\n")
    with pytest.raises(WorkloadError) as info:
        load(f)
    assert f"{f}:2: " in str(info.value)
    assert says in str(info.value)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match="neither a built-in set"):
        load(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(WorkloadError, match="no prompts"):
        load(empty)


def test_every_builtin_prompt_has_a_scorable_reference() -> None:
    """Accuracy parity scores the default set against its references (dataset mode)."""
    from pytest_tokperf import workloads as w

    prompts = w.load("default").prompts
    assert len(prompts) == 64
    for p in prompts:
        assert p.reference is not None, p.id
        words = p.reference.split()
        # a one-to-three sentence answer: long enough for ROUGE-2, short enough for 64 tokens
        assert 8 <= len(words) <= 45, (p.id, len(words))
        assert p.reference.rstrip()[-1] in ".!?", p.id


def test_a_profile_measured_on_a_dataset_needs_it(tmp_path: Path) -> None:
    """The GPU floors are MLPerf OpenOrca numbers: without that set, say how to make it."""
    from pytest_tokperf import workloads as w

    path, missing = w.profile_dataset("gb300-nvl72", w.MLPERF_OPENORCA, "built-in", None)
    assert path is None and missing is not None
    assert "profile 'gb300-nvl72'" in missing and "24,576" in missing
    assert w.MAKE_OPENORCA in missing and "--tokperf-dataset PATH" in missing
    orca = tmp_path / "openorca.jsonl"
    orca.write_text('{"id": "0", "prompt": "p", "reference": "r"}\n')
    given = (str(orca), "--tokperf-dataset")
    assert w.profile_dataset("gb300-nvl72", w.MLPERF_OPENORCA, "built-in", given) == (orca, None)
    with pytest.raises(WorkloadError, match=r"'nope.jsonl' \(from --tokperf-dataset\)"):
        w.profile_dataset("cpu", None, "built-in", ("nope.jsonl", "--tokperf-dataset"))
    # no dataset in the profile: the built-in set; a user profile's path is relative to it
    assert w.profile_dataset("cpu", None, "built-in", None) == (None, None)
    toml = tmp_path / "tokperf.toml"
    assert w.profile_dataset("mine", "openorca.jsonl", str(toml), None) == (orca, None)
    _, missing = w.profile_dataset("mine", "other.jsonl", str(toml), None)
    assert missing is not None and "the dataset 'other.jsonl'" in missing


def test_throughput_requests_can_go_without_text() -> None:
    wl = load(None)
    assert all(r.detokenize for r in wl.requests(3, None, 8))
    assert not any(r.detokenize for r in wl.requests(3, None, 8, detokenize=False))
