"""TTFT with the embedded engine's prefix cache primed against the same run after a flush.

The embedded engine (SmolLM2-135M Q4_1, `prefix_cache = true`, both cores) runs a
shared-prefix workload (`workloads.shared_prefix`: --groups prefixes of --prefix
tokens, each with --per-group suffixes of --suffix tokens, round the groups) with
--max-tokens new tokens each, one request at a time (concurrency 1: each TTFT is
its own prefill, not a queue), no warm-up, in pairs: after `tokperf_cache.flush()`, then
after `tokperf_cache.prime(workload)`; the order inside a pair alternates, so a drift
on the host favours neither. Prints each run's TTFT p50 / p90 (LoadGen's percentile
rule) and prefix-cache hit rate, then the medians over the pairs and their ratio, and
whether `cache_hit_rate=(0.9, 1.0)` made each flushed run INVALID.

    python benchmarks/prefix_cache.py --pairs 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics

from client_overhead import cpu_name  # this directory's (a script's sys.path)

from pytest_tokperf import cache, driver, profiles, workloads
from pytest_tokperf.engines import Request, load_engine
from pytest_tokperf.runner import Tokperf
from pytest_tokperf.verdict import run_validity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--prefix", type=int, default=400)
    ap.add_argument("--suffix", type=int, default=16)
    ap.add_argument("--per-group", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=4)
    args = ap.parse_args()
    work = workloads.shared_prefix(args.groups, args.prefix, args.suffix, args.per_group)
    engine = load_engine("llamacpp", {"n_threads": 2, "prefix_cache": True})

    def prime(prompts: list[str]) -> None:
        driver.run(engine, [Request(f"p{i}", p, 1) for i, p in enumerate(prompts)])

    tokperf_cache = cache.Cache(engine, prime)  # what the fixture gives a test
    runner = Tokperf(engine, profiles.BUILTIN["cpu"])
    n = len(work.prompts)
    seen: dict[str, list[float]] = {"flushed": [], "primed": []}
    print(f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores; {work.name}")
    for pair in range(args.pairs):
        order = ("flushed", "primed") if pair % 2 == 0 else ("primed", "flushed")
        for state in order:
            tokperf_cache.flush() if state == "flushed" else tokperf_cache.prime(work)
            result = runner.run("concurrency", n, args.max_tokens, work, concurrency=1,
                                warmup=0, cache_hit_rate=(0.9, 1.0))  # fmt: skip
            rate = result.cache["hit_rate"] if result.cache else None
            invalid = any("prefix-cache" in r for r in run_validity(result))
            p50, p90 = result.ttft.p50, result.ttft.p90
            assert p50 is not None and p90 is not None and rate is not None
            seen[state].append(p50)
            print(f"pair {pair + 1} {state:8s} TTFT p50 {p50 * 1000:7.1f} ms  p90 "
                  f"{p90 * 1000:7.1f} ms  hit rate {rate:.3f}  INVALID {invalid}")  # fmt: skip
    cold, warm = statistics.median(seen["flushed"]), statistics.median(seen["primed"])
    print(f"median TTFT p50: flushed {cold * 1000:.1f} ms, primed {warm * 1000:.1f} ms, "
          f"primed / flushed {warm / cold:.2f}")  # fmt: skip
    asyncio.run(engine.aclose())


if __name__ == "__main__":
    main()
