"""latency_slo, INVALID, INCONCLUSIVE policies, early stopping and progress, on the sim profile.

The sim engine (no model) makes these whole-suite runs take seconds; the same paths on
the real embedded model are in tests/engine/test_server.py.
"""

from __future__ import annotations

import json

import pytest

SIM = ("--tokperf-profile", "sim", "-p", "no:cacheprovider", "--tokperf-json", "out.json")

SLO_SUITE = """
import pytest

def serve(tokperf, requests=20):
    # 5 requests/s keeps the lag tolerance at 20 ms, wide enough for a busy CI machine
    return tokperf.run("server", qps=5, requests=requests, max_tokens=4)

@pytest.mark.latency_slo(ttft_p50_ms=0.001)
def test_impossible(tokperf):
    serve(tokperf)

@pytest.mark.latency_slo(ttft_p50_ms={"sim": 60_000, "cpu": 60_000}, tpot_p50_ms=60_000)
def test_loose(tokperf):
    result = serve(tokperf)
    assert result.ttft.p50 is not None and result.tpot.p50 is not None

@pytest.mark.latency_slo(ttft_p99_ms=60_000)
def test_too_few_for_p99(tokperf):
    serve(tokperf)

@pytest.mark.latency_slo(ttft_p50_ms={"gb300-nvl72": 450})
def test_rack_only(tokperf):
    raise AssertionError("must not run on the sim profile")

@pytest.mark.latency_slo()
def test_interactive_defaults(tokperf):
    tokperf.run("interactive", qps=5, requests=20, max_tokens=4)
"""


def _tests(pytester: pytest.Pytester) -> dict[str, dict]:
    doc = json.loads((pytester.path / "out.json").read_text())
    return {t["nodeid"].split("::")[1]: t for t in doc["tests"]}


def test_latency_slos_gate_and_explain(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_slo=SLO_SUITE)
    result = pytester.runpytest(*SIM, "-rs")
    result.assert_outcomes(passed=1, failed=3, skipped=1)
    out = result.stdout.str()
    context = "[profile sim, engine sim, model sim none, 1 device, 20 requests, qps 5]"
    assert "server TTFT p50 " in out  # the observed value varies; the rest does not
    assert " ms > limit 0.00 ms (20 of 20 requests over; early-stopping estimate " in out
    result.stdout.fnmatch_lines(
        [
            "INVALID measurement: TTFT p99: 0 of 20 requests over 60,000 ms; LoadGen's "
            "early-stopping estimate needs at least 459 requests with 0 over (or fewer over) "
            "to accept p99 at 99% confidence (observed p99 * ms, early-stopping estimate -) "
            + context.replace("[", "?")  # fnmatch reads [ as a character class
        ]
    )
    result.stdout.fnmatch_lines(
        ["*SKIPPED*latency_slo(ttft_p50_ms=...) sets no limit for profile 'sim'*"]
    )
    assert "INVALID measurement: TPOT p99: 0 of 20 requests over 40 ms; LoadGen's" in out
    tests = _tests(pytester)
    assert {k: t["verdict"] for k, t in tests.items()} == {
        "test_impossible": "FAIL",
        "test_loose": "PASS",
        "test_too_few_for_p99": "INVALID",
        "test_rack_only": "SKIPPED",
        "test_interactive_defaults": "INVALID",
    }
    loose = tests["test_loose"]
    assert loose["slos_ms"] == {"ttft_p50_ms": 60_000, "tpot_p50_ms": 60_000}
    assert loose["goodput_per_s"] == pytest.approx(20 / loose["duration_s"])  # every request
    # every request met the limits: goodput in tokens is every output token per second
    assert loose["goodput_tokens_per_s"] == pytest.approx(
        loose["output_tokens"] / loose["duration_s"]
    )
    assert loose["itl_s"]["count"] == 20 * 3 and loose["lag_s"]["count"] == 20
    assert loose["scheduled_qps"] > 0 and loose["invalid"] == []
    impossible = tests["test_impossible"]
    assert impossible["goodput_per_s"] == 0.0
    assert impossible["goodput_tokens_per_s"] == 0.0
    (check,) = [c for c in impossible["checks"] if c["metric"] == "ttft_p50_ms"]
    assert check["observed"] == pytest.approx(impossible["ttft_s"]["p50"] * 1000)
    # a bare marker took the profile's interactive defaults
    assert tests["test_interactive_defaults"]["slos_ms"] == {
        "ttft_p99_ms": 500.0,
        "tpot_p99_ms": 40.0,
    }


# TTFT draws of the sim engine below for the default workload's first 44 requests
# (seed 0, exponential with mean 100 ms): the p90 (5th highest) 256 ms, the two
# highest 446 and 798 ms; test_three_slo_outcomes checks these before relying on them
SLO_ENGINE = {"tokens_per_s": 100.0, "ttft_s": 0.1, "jitter": 1.0, "slots": 64, "seed": 0}
SLO_OUTCOMES = """
import pytest

def serve(tokperf):
    tokperf.run("server", qps=5, requests=44, max_tokens=2)

@pytest.mark.latency_slo(ttft_p90_ms=1500)  # none over: 44 requests prove a p90
def test_pass(tokperf):
    serve(tokperf)

@pytest.mark.latency_slo(ttft_p90_ms=620)  # 1 over: the p90 is met, 64 are needed
def test_invalid(tokperf):
    serve(tokperf)

@pytest.mark.latency_slo(ttft_p90_ms=150)  # the observed p90 itself misses
def test_fail(tokperf):
    serve(tokperf)
"""


def test_three_slo_outcomes(pytester: pytest.Pytester) -> None:
    from pytest_tokperf import workloads
    from pytest_tokperf.engines.sim import parse_settings, request_timeline

    settings = parse_settings(SLO_ENGINE)
    draws = sorted(
        request_timeline(settings, r)[0][0] for r in workloads.load(None).requests(44, 2, 64)
    )
    assert [round(d, 3) for d in (draws[39], draws[-2], draws[-1])] == [0.256, 0.446, 0.798]
    engine = ", ".join(f"{k} = {v}" for k, v in SLO_ENGINE.items())
    pytester.makefile(".toml", tokperf=f'[profiles.slo]\nextends = "sim"\nengine = {{ {engine} }}')
    pytester.makepyfile(test_outcomes=SLO_OUTCOMES)
    # the full table (its SLO column): the default 120-column one leaves that column out
    result = pytester.runpytest("--tokperf-profile", "slo", *SIM[2:], "--tokperf-table", "wide")
    result.assert_outcomes(passed=1, failed=2)
    context = "[profile slo, engine sim, model sim none, 1 device, 44 requests, qps 5]"
    result.stdout.fnmatch_lines(
        [
            "INVALID measurement: TTFT p90: 1 of 44 requests over 620 ms; LoadGen's "
            "early-stopping estimate needs at least 64 requests with 1 over (or fewer over) "
            "to accept p90 at 99% confidence (observed p90 2* ms, early-stopping estimate "
            "* ms) " + context.replace("[", "?"),  # fnmatch reads [ as a character class
            "server TTFT p90 2* ms > limit 150 ms (* of 44 requests over; early-stopping "
            "estimate * ms) " + context.replace("[", "?"),
        ]
    )
    result.stdout.fnmatch_lines(["*test_outcomes.py::test_invalid*TTFT p90 2*/* ms*INVALID*"])
    tests = _tests(pytester)
    assert {k: t["verdict"] for k, t in tests.items()} == {
        "test_pass": "PASS",
        "test_invalid": "INVALID",
        "test_fail": "FAIL",
    }
    for name, status, over, needed in (
        ("test_pass", "PASS", 0, 44),
        ("test_invalid", "INVALID", 1, 64),
    ):
        (check,) = [c for c in tests[name]["checks"] if c["metric"] == "ttft_p90_ms"]
        assert (check["status"], check["count"], check["over"], check["needed"]) == (
            status,
            44,
            over,
            needed,
        )
        # observed p90 and LoadGen's estimate (here the highest of 44) side by side
        assert check["observed"] == pytest.approx(tests[name]["ttft_s"]["p90"] * 1000)
        assert check["estimate"] == pytest.approx(tests[name]["ttft_s"]["p999"] * 1000)
        assert check["confidence"] == 0.99
    (check,) = [c for c in tests["test_fail"]["checks"] if c["metric"] == "ttft_p90_ms"]
    assert check["status"] == "FAIL" and check["over"] >= 5


INCONCLUSIVE = """
import pytest

@pytest.mark.throughput_floor(min_tokens_per_s=1)
def test_straddles(tokperf):
    # one request cannot make an Offline run's ten batch windows: nothing is decided
    tokperf.run(requests=1, max_tokens=2, warmup=0)
"""


@pytest.mark.parametrize(
    ("args", "env", "outcome"),
    [
        ([], {}, "failed"),
        (["--tokperf-inconclusive", "skip"], {}, "skipped"),
        ([], {"TOKPERF_INCONCLUSIVE": "pass"}, "passed"),
        (["--tokperf-inconclusive", "fail"], {"TOKPERF_INCONCLUSIVE": "pass"}, "failed"),
    ],
)
def test_inconclusive_policy(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, args, env, outcome
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    pytester.makepyfile(test_inc=INCONCLUSIVE)
    result = pytester.runpytest(*SIM, "-rs", *args)
    result.assert_outcomes(**{outcome: 1})
    if outcome != "passed":
        result.stdout.fnmatch_lines(
            [
                "*INCONCLUSIVE: offline output tokens/s * has no interval: 1 request cannot "
                "make 10 independent batch windows: at least 10 needed ?profile sim, engine sim, *"
            ]
        )
    assert _tests(pytester)["test_straddles"]["verdict"] == "INCONCLUSIVE"


@pytest.mark.parametrize(
    ("args", "env", "ini", "says"),
    [
        (["--tokperf-inconclusive", "maybe"], {}, "", "--tokperf-inconclusive must be one of"),
        ([], {"TOKPERF_INCONCLUSIVE": "x"}, "", "environment variable TOKPERF_INCONCLUSIVE"),
        ([], {}, "tokperf_inconclusive = nope", "ini option tokperf_inconclusive in"),
        (["--tokperf-confidence", "95"], {}, "", "--tokperf-confidence must be a number from 0.5"),
        ([], {"TOKPERF_CONFIDENCE": "1"}, "", "environment variable TOKPERF_CONFIDENCE must be"),
        ([], {}, "tokperf_confidence = high", "ini option tokperf_confidence in"),
    ],
)
def test_bad_policy_and_confidence_are_usage_errors(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, args, env, ini, says
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: *{says}*"])


def test_confidence_option_sets_the_interval(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.throughput_floor(per_gpu=1e9)
        def test_slow(tokperf):
            tokperf.run(requests=10, max_tokens=8)
        """
    )
    result = pytester.runpytest(*SIM, "--tokperf-confidence", "0.8")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*offline output tokens/s per device * (80% CI *-*) < floor*"])
    (test,) = _tests(pytester).values()
    assert test["confidence"] == 0.8


EARLY = """
import pytest

@pytest.mark.throughput_floor(min_tokens_per_s={"sim": 1})
def test_clearly_fast(tokperf):
    result = tokperf.run("concurrency", concurrency=4, max_duration_s=32, max_tokens=8)
    assert result.stopped.startswith("early stop after")

@pytest.mark.throughput_floor(min_tokens_per_s={"sim": 1e9})
def test_clearly_slow(tokperf):
    tokperf.run("concurrency", concurrency=4, max_duration_s=32, max_tokens=8)
"""


def test_sequential_early_stopping_decides_long_before_the_maximum(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_early=EARLY)
    result = pytester.runpytest(*SIM)
    result.assert_outcomes(passed=1, failed=1)
    tests = _tests(pytester)
    for name in ("test_clearly_fast", "test_clearly_slow"):
        t = tests[name]
        assert t["stopped"].startswith("early stop after"), t["stopped"]
        assert t["looks"] == 5
        # looks at 2, 4, 8 and 16 s: the verdict came at a look, not at the 32 s maximum
        assert t["duration_s"] < 32 / 2
    result.stdout.fnmatch_lines(
        [  # the confidence each look used, and the whole run's
            "*concurrency output tokens/s * (99% CI *-* per look; 95% over 5 looks) "
            "< floor 1,000,000,000*"
        ]
    )


PROGRESS = """
def test_long(tokperf):
    tokperf.run("concurrency", concurrency=2, duration_s=3.6, max_tokens=8)
"""


def test_progress_line_on_long_runs_and_quiet_under_q(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_progress=PROGRESS)
    result = pytester.runpytest(*SIM)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["tokperf: * s, */* requests done, * tokens/s (95% CI *-*)"])
    quiet = pytester.runpytest(*SIM, "-q")
    quiet.assert_outcomes(passed=1)
    assert "requests done" not in quiet.stdout.str()
