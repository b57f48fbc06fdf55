"""How often is a trace replay's validity wrong? The sim engine, whose truth is known.

For --seeds seeds, a Mooncake-format trace of --requests requests over --span seconds
(arrival times uniform, output lengths uniform in 1..--max-output) is replayed twice:
on a sim engine that keeps up (64 slots, 5 ms TTFT, 1,000 tokens/s per request) and
on one that cannot (1 slot at --slow tokens/s: the trace asks for more service time
than it lasts). A replay on the engine that keeps up is wrong when it is INVALID for
load, or for a lag its own issue times do not show (p99 issue error <= 10 ms); one
that cannot is wrong unless it is INVALID for load. Prints the count of wrong answers
of each kind, the keeps-up runs INVALID for a real lag (a late client, counted apart)
and the worst p99 issue error (issue time against trace time, from the first request).

    python benchmarks/trace_validity.py --seeds 10
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from pytest_tokperf import profiles
from pytest_tokperf.engines import load_engine
from pytest_tokperf.runner import Tokperf
from pytest_tokperf.verdict import run_validity

NS = 1_000_000_000


def write_trace(path: Path, seed: int, n: int, span_s: float, longest: int) -> list[float]:
    rng = random.Random(seed)
    times = sorted([0.0] + [rng.uniform(0, span_s) for _ in range(n - 1)])
    path.write_text("".join(
        json.dumps({"timestamp": round(t * 1000), "input_length": rng.randint(100, 2000),
                    "output_length": rng.randint(1, longest)}) + "\n"
        for t in times
    ))  # fmt: skip
    return [round(t * 1000) / 1000 for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--span", type=float, default=2.0)
    ap.add_argument("--max-output", type=int, default=60)
    ap.add_argument("--slow", type=float, default=500.0)
    args = ap.parse_args()
    fast = {"slots": 64, "ttft_s": 0.005, "tokens_per_s": 1000}
    slow = {"slots": 1, "ttft_s": 0.005, "tokens_per_s": args.slow}
    wrong = {"keeps up": 0, "falls behind": 0}
    worst = 0.0
    lags = 0  # keeps-up runs INVALID for a lag their issue times show (a busy client)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.jsonl"
        for seed in range(args.seeds):
            times = write_trace(path, seed, args.requests, args.span, args.max_output)
            for truth, settings in (("keeps up", fast), ("falls behind", slow)):
                engine = load_engine("sim", {**settings, "seed": seed})
                result = Tokperf(engine, profiles.BUILTIN["sim"]).run(
                    scenario="trace", workload=str(path), warmup=0
                )
                reasons = run_validity(result)
                first = min(r.issue_ns for r in result.records)
                errors = sorted(
                    abs((r.issue_ns - first) / NS - times[int(r.id.split("-")[1])])
                    for r in result.records
                )
                p99 = errors[int(len(errors) * 0.99)]
                load = [r for r in reasons if "did not sustain" in r]
                lagged = [r for r in reasons if "fell behind" in r]
                if truth == "keeps up":
                    # wrong: a load reason, or a lag reason the issue times do not show
                    wrong[truth] += bool(load) or (bool(lagged) and p99 <= 0.010)
                    lags += bool(lagged)
                else:
                    wrong[truth] += not load
                worst = max(worst, p99) if truth == "keeps up" else worst
                print(f"seed {seed} {truth:12s} p99 issue error {p99 * 1000:6.2f} ms  "
                      f"{'INVALID: ' + '; '.join(reasons) if reasons else 'valid'}")  # fmt: skip
    for truth, count in wrong.items():
        print(f"{truth}: wrong {count} of {args.seeds}")
    print(f"keeps up, INVALID for a real issue lag (the client was late): {lags}")
    print(f"worst p99 issue error where the engine kept up: {worst * 1000:.2f} ms")


if __name__ == "__main__":
    main()
