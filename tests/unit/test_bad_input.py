"""Bad input never crashes and never passes: properties over every input a user writes.

Marker arguments, `tokperf.run` arguments, JSONL workloads and TOML profiles: each
input is either accepted, and then every value given is kept and valid, or refused
with a `pytest.UsageError` / `ValueError` naming where it came from (the test, the
call, file:line, the profile key). Any other exception fails the property.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_tokperf import markers, profiles, slo, verdict, workloads
from pytest_tokperf.engines import load_engine
from pytest_tokperf.metrics import RunResult
from pytest_tokperf.runner import Tokperf

WHERE = "test_suite.py::test_it"
PROFILES = tuple(profiles.BUILTIN)
BIG = 10**400  # an int no float holds

# everything a Python marker argument or a TOML value can be, and then some
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**3), max_value=10**3),
    st.sampled_from([0, -1, BIG, -BIG, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.sampled_from(PROFILES),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(
            st.one_of(st.sampled_from(PROFILES), st.text(max_size=4)), inner, max_size=3
        ),
    ),
    max_leaves=5,
)


# numbers at and past every edge, mixed with valid values so one bad value stands alone
edges = st.sampled_from([0, -1, 1, 0.5, BIG, -BIG, math.inf, -math.inf, math.nan, True, "1", None])
amounts = st.one_of(st.floats(0.001, 1e6), edges)
bound_values = st.one_of(
    amounts, st.dictionaries(st.sampled_from(PROFILES), amounts, max_size=2), values
)


def positive_finite(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


# --- marker arguments ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("marker", "parse", "keywords"),
    [
        ("throughput_floor", markers.parse_floor_marker, tuple(verdict.FLOOR_METRICS)),
        ("latency_slo", markers.parse_slo_marker, slo.SLO_KEYWORDS[:4]),
    ],
)
@settings(max_examples=400)  # parsing is cheap; edges are one draw in a dozen
@given(data=st.data())
def test_bound_markers(marker: str, parse: Any, keywords: tuple[str, ...], data: Any) -> None:
    args = data.draw(st.lists(values, max_size=1))
    kwargs = data.draw(
        st.dictionaries(st.sampled_from((*keywords, "bogus")), bound_values, max_size=3)
    )
    try:
        bounds = parse(args, kwargs, WHERE, PROFILES)
    except pytest.UsageError as exc:
        assert str(exc).startswith(WHERE)
        return
    assert not args and "bogus" not in kwargs
    for key, value in kwargs.items():
        if value is None:  # the documented "not given"
            assert key not in bounds
        elif isinstance(value, dict):
            assert set(bounds[key]) == set(value) <= set(PROFILES)
            assert all(positive_finite(v) and v == value[p] for p, v in bounds[key].items())
        else:
            assert positive_finite(bounds[key]) and bounds[key] == value


PARITY_KEYS = ("reference", "rouge_ratio", "tokens_per_sample", "max_kl", "min_top1", "dataset")


def fractions(most: float) -> st.SearchStrategy[object]:
    return st.one_of(st.floats(0.001, most), edges, values)


PARITY_VALUES: dict[str, Any] = {
    "reference": st.one_of(st.sampled_from((None, "f16", "q4_0", "", 3)), values),
    "rouge_ratio": fractions(1.0),
    "tokens_per_sample": st.one_of(
        st.tuples(st.one_of(st.floats(0, 1), edges), st.one_of(st.floats(1, 3), edges)), values
    ),
    "max_kl": fractions(10.0),
    "min_top1": fractions(1.0),
    "dataset": st.sampled_from((None, "default", 5, b"x")),
    "bogus": values,
}


@settings(max_examples=400)
@given(args=st.lists(values, max_size=1), kwargs=st.fixed_dictionaries({}, optional=PARITY_VALUES))
def test_parity_marker(args: list[object], kwargs: dict[str, object]) -> None:
    precisions = ("f16", "q8_0")
    try:
        spec = markers.parse_parity_marker(args, kwargs, WHERE, precisions)
    except pytest.UsageError as exc:
        assert str(exc).startswith(WHERE)
        return
    assert not args and "bogus" not in kwargs
    assert spec.reference in (None, *precisions) and spec.reference == kwargs.get("reference")
    assert 0 < spec.rouge_ratio <= 1
    low, high = spec.tokens_per_sample
    assert math.isfinite(low) and math.isfinite(high) and 0 <= low <= 1 <= high
    assert spec.max_kl is None or positive_finite(spec.max_kl)
    assert spec.min_top1 is None or 0 < spec.min_top1 <= 1
    for key in ("rouge_ratio", "max_kl", "min_top1"):
        if kwargs.get(key) is not None:
            assert getattr(spec, key) == kwargs[key]  # given: kept, never a default


# --- tokperf.run arguments -----------------------------------------------------------

wild_ints = st.one_of(st.none(), st.booleans(), st.integers(-2, 3), st.just(BIG),
                      st.floats(allow_nan=True), st.text(max_size=2))  # fmt: skip
# valid durations stay short: a valid endless run must end within the property
wild_seconds = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(max_value=0.03),
    st.sampled_from([math.nan, math.inf, -math.inf, BIG, -1, 0, "1", [1]]),
)
RUN_ARGS: dict[str, Any] = {
    "scenario": st.sampled_from(("offline", "server", "interactive", "concurrency", "batch", 1)),
    "requests": wild_ints,
    "max_tokens": wild_ints,
    "workload": st.sampled_from((None, "default", "no-such.jsonl", 5, ["default"], b"x")),
    "qps": st.one_of(st.none(), st.floats(min_value=2_000, max_value=1e9), wild_seconds),
    "concurrency": wild_ints,
    "duration_s": wild_seconds,
    "max_duration_s": wild_seconds,
    "min_duration_s": wild_seconds.filter(lambda v: v is not None),
    "min_requests": wild_ints.filter(lambda v: v is not None),
    "seed": st.one_of(wild_ints.filter(lambda v: v is not None), st.just(2**70)),
    "warmup": wild_ints,
    "timeout_s": st.one_of(wild_seconds, st.just(60.0)),
}


@pytest.fixture(scope="module")
def runner() -> Tokperf:
    """The sim engine 1,000 times faster than life: a valid run takes milliseconds."""
    engine = load_engine("sim", {"time_scale": 1000.0, "slots": 4, "jitter": 0.0}, 1)
    return Tokperf(engine, profiles.BUILTIN["sim"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(kwargs=st.fixed_dictionaries({}, optional=RUN_ARGS))
def test_run_arguments(runner: Tokperf, kwargs: dict[str, Any]) -> None:
    try:
        result = runner.run(**kwargs)
    except ValueError as exc:
        named = str(exc).startswith("tokperf.run") or "workload 'no-such.jsonl'" in str(exc)
        assert named, str(exc)
        return
    assert isinstance(result, RunResult) and result.requests >= 1
    assert result.scenario == kwargs.get("scenario", "offline")
    assert result.qps == kwargs.get("qps") and result.concurrency == kwargs.get("concurrency")
    if kwargs.get("requests") is not None and not kwargs.get("max_duration_s"):
        assert result.requests == kwargs["requests"]


ACCURACY_ARGS: dict[str, Any] = {
    "dataset": st.sampled_from((None, "default", 5, ["x"])),
    "samples": wild_ints,
    "max_tokens": wild_ints,
    "reference": st.sampled_from((None, "f16", "", 3)),
    "rouge_ratio": st.one_of(st.none(), wild_seconds, st.floats(0, 2)),
    "tokens_per_sample": st.one_of(st.none(), values, st.tuples(wild_seconds, wild_seconds)),
    "max_kl": st.one_of(st.none(), wild_seconds, st.floats(0, 2)),
    "min_top1": st.one_of(st.none(), wild_seconds, st.floats(0, 2)),
    "timeout_s": wild_seconds.filter(lambda v: v is not None),
}


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kwargs=st.fixed_dictionaries({}, optional=ACCURACY_ARGS))
def test_accuracy_arguments_are_checked_before_any_engine_runs(
    runner: Tokperf, kwargs: dict[str, Any]
) -> None:
    # this runner has no reference engine: arguments that pass their checks end there
    with pytest.raises(ValueError, match=r"^tokperf\.accuracy\(") as caught:
        runner.accuracy(**kwargs)
    if "reference engine" in str(caught.value) or "reference_precision" in str(caught.value):
        spec = markers.parse_parity_marker(
            (), {k: v for k, v in kwargs.items() if k in PARITY_KEYS and v is not None}, WHERE, None
        )  # the same arguments pass the marker's checks too
        assert spec.rouge_ratio == kwargs.get("rouge_ratio") or kwargs.get("rouge_ratio") is None


# --- JSONL workloads -------------------------------------------------------------------

prompt_objects = st.fixed_dictionaries(
    {"id": st.text(min_size=1), "prompt": st.text(min_size=1)},
    optional={"max_tokens": st.integers(1, 10**6), "reference": st.text()},
)


@given(st.lists(prompt_objects, min_size=1, max_size=5, unique_by=lambda p: p["id"]))
def test_any_valid_workload_reads_back_unchanged(objects: list[dict[str, Any]]) -> None:
    # raw unicode, U+2028 and U+0085 included: JSON leaves them unescaped
    text = "\n".join(json.dumps(o, ensure_ascii=False) for o in objects) + "\n"
    prompts = workloads.parse_jsonl(text, "w.jsonl")
    assert [p.id for p in prompts] == [o["id"] for o in objects]
    assert [p.prompt for p in prompts] == [o["prompt"] for o in objects]
    assert [p.max_tokens for p in prompts] == [o.get("max_tokens") for o in objects]
    assert [p.reference for p in prompts] == [o.get("reference") for o in objects]


line_texts = st.one_of(
    st.text(max_size=30),
    values.map(lambda v: json.dumps(v, default=str)),
    prompt_objects.map(json.dumps),
    st.fixed_dictionaries({"id": values, "prompt": values, "max_tokens": values}).map(
        lambda o: json.dumps(o, default=str)
    ),
    st.sampled_from(
        ["[" * 100_000, '{"id": "a", "prompt": "p", "max_tokens": ' + "9" * 5_000 + "}"]
    ),
)


@given(st.lists(line_texts, max_size=4))
def test_any_jsonl_text_reads_or_names_its_line(lines: list[str]) -> None:
    text = "\n".join(lines)
    try:
        prompts = workloads.parse_jsonl(text, "w.jsonl")
    except workloads.WorkloadError as exc:
        assert re.match(r"w\.jsonl(:\d+)?: ", str(exc)), str(exc)
        match = re.match(r"w\.jsonl:(\d+): ", str(exc))
        if match:  # the line named is a real line of the file, and not a blank one
            assert text.split("\n")[int(match[1]) - 1].strip()
        return
    assert prompts and all(p.id and p.prompt for p in prompts)
    assert all(p.max_tokens is None or p.max_tokens >= 1 for p in prompts)


def test_a_workload_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_bytes(b'{"id": "a", "prompt": "caf\xe9"}\n')
    with pytest.raises(workloads.WorkloadError, match=r"w\.jsonl: not UTF-8 text \(byte 26"):
        workloads.load(path)


# --- TOML profiles ---------------------------------------------------------------------


def toml(value: object) -> str:
    """A TOML value (inline), for the few types the strategies make."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if value != value else repr(value).replace("inf", "inf")
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    assert isinstance(value, Mapping)
    return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml(v)}" for k, v in value.items()) + " }"


toml_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=6),
    st.sampled_from([*PROFILES, *profiles.BACKEND_NAMES, "gpu", "cpu", "[", "GB3.*"]),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    *verdict.FLOOR_METRICS,
                    *profiles.SLO_SCENARIOS,
                    *slo.SLO_KEYWORDS[:3],
                    *profiles.PARITY_KEYS,
                    "x",
                ]
            ),
            inner,
            max_size=3,
        )
    ),
    max_leaves=5,
)
INT_KEYS = {"devices": 1, "requests": 1, "max_tokens": 1, "warmup": 0, "nodes": 1,
            "tensor_parallel_size": 1}  # fmt: skip
amounts = st.floats(0.5, 1e6)
# a valid value for each key, so that accepted tables are drawn often too
VALID: dict[str, Any] = {
    **{key: st.integers(least, 64) for key, least in INT_KEYS.items()},
    "description": st.text(min_size=1, max_size=5),
    "backend": st.sampled_from(profiles.BACKEND_NAMES),
    "device_kind": st.sampled_from(("cpu", "gpu")),
    "precision": st.sampled_from(("fp8", "q4_1")),
    "model": st.sampled_from(("m", "llama2-70b")),
    "floors": st.dictionaries(st.sampled_from(tuple(verdict.FLOOR_METRICS)), amounts),
    "engine": st.dictionaries(st.sampled_from(("slots", "x")), st.integers(1, 4)),
    "gpu_name": st.sampled_from(("", "GB300", "H100.*(SXM|HBM3)")),
    "min_memory_gib": st.floats(0, 1e3),
    "rack_floor": amounts,
    "slos": st.dictionaries(
        st.sampled_from(profiles.SLO_SCENARIOS),
        st.dictionaries(st.sampled_from(slo.SLO_KEYWORDS[:3]), amounts),
    ),
    "parity": st.dictionaries(st.sampled_from(profiles.PARITY_KEYS), st.floats(0.5, 1.5)),
}


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    extends=st.sampled_from([None, "sim", "cpu", "gb300-nvl72", "mine", 3]),
    keys=st.lists(st.sampled_from([*profiles.KEYS, "bogus"]), max_size=4, unique=True),
    data=st.data(),
)
def test_any_profile_table_loads_valid_or_names_file_profile_and_key(
    tmp_path: Path, extends: object, keys: list[str], data: Any
) -> None:
    table = {k: data.draw(st.one_of(VALID.get(k, toml_values), toml_values), label=k) for k in keys}
    path = tmp_path / "tokperf.toml"
    body = {**({} if extends is None else {"extends": extends}), **table}
    path.write_text("[profiles.mine]\n" + "".join(f"{k} = {toml(v)}\n" for k, v in body.items()))
    try:
        registry = profiles.load_user(tmp_path)
    except pytest.UsageError as exc:
        assert str(exc).startswith(f"{path}: "), str(exc)
        return
    p = registry["mine"]
    assert "bogus" not in table and p.defined_in == str(path)
    for key, least in INT_KEYS.items():
        value = getattr(p, key)
        assert isinstance(value, int) and value >= least
    assert p.backend in profiles.BACKEND_NAMES and p.device_kind in ("cpu", "gpu")
    assert all(positive_finite(v) for v in p.floors.values())
    assert all(positive_finite(v) for s in p.slos.values() for v in s.values())
    assert all(positive_finite(v) for v in p.parity.values())
    assert math.isfinite(p.min_memory_gib) and p.min_memory_gib >= 0
    assert p.rack_floor is None or positive_finite(p.rack_floor)
    re.compile(p.gpu_name)
    for key, value in table.items():  # what was given is what the profile holds
        if key == "compute_capability":  # "10.3" or 10.3 -> (10, 3)
            assert p.compute_capability == tuple(int(n) for n in str(value).split("."))
        elif key not in profiles.MERGED:
            assert getattr(p, key) == value
        elif key != "engine":
            assert value.items() <= getattr(p, key).items() or key == "slos"


def test_tool_tokperf_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool]\ntokperf = 1\n")
    expected = r"pyproject\.toml: \[tool\.tokperf\] must be a table"
    with pytest.raises(pytest.UsageError, match=expected):
        profiles.load_user(tmp_path)


def test_a_profile_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "tokperf.toml").write_bytes(b'[profiles.mine]\ndescription = "caf\xe9"\n')
    with pytest.raises(pytest.UsageError, match=r"tokperf\.toml: not valid TOML"):
        profiles.load_user(tmp_path)
