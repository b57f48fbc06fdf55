"""What loading without llama.cpp's extra buffer types costs in tokens/s.

The embedded engine turns extra buffer types (weight repacking: AMX, CPU_REPACK)
off on AMX CPUs, where the AMX one crashes (ggml-org/llama.cpp#20824). This loads
the same model twice, `extra_bufts = true` and `false`, each in its engine child,
and runs the same Offline requests through both in alternating order.

    python benchmarks/extra_bufts.py --rounds 7                      # shipped Q4_1
    python benchmarks/extra_bufts.py --rounds 7 --precision q4_0     # repackable here
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics

from fidelity import bootstrap_median_ci

from pytest_tokperf import driver, metrics, workloads
from pytest_tokperf.engines import Engine, Request, load_engine


def rate(engine: Engine, requests: list[Request]) -> float:
    records = driver.run(engine, requests)
    assert all(r.ok for r in records), [r.error for r in records if r.error]
    return metrics.output_tokens_per_s(records)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--precision", default="")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    settings = {
        "n_threads": args.threads,
        **({"precision": args.precision} if args.precision else {}),
    }
    on = load_engine("llamacpp", {**settings, "extra_bufts": True})
    off = load_engine("llamacpp", {**settings, "extra_bufts": False})
    requests = workloads.load(None).requests(args.requests, args.max_tokens, args.max_tokens)
    ratios = []
    try:
        rate(on, requests), rate(off, requests)  # warm-up
        for i in range(args.rounds):
            if i % 2 == 0:
                a = rate(on, requests)
                b = rate(off, requests)
            else:
                b = rate(off, requests)
                a = rate(on, requests)
            ratios.append(b / a)
            print(f"round {i + 1}: extra_bufts on {a:.1f} tok/s, off {b:.1f}, off/on {b / a:.3f}")
    finally:
        asyncio.run(on.aclose())
        asyncio.run(off.aclose())
    lo, hi = bootstrap_median_ci(ratios)
    print(
        f"{on.info.model} {on.info.precision}: off/on median {statistics.median(ratios):.3f} "
        f"(95% bootstrap CI of the median {lo:.3f}-{hi:.3f}, {args.rounds} rounds, "
        f"load average {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
