"""Client throughput with 1 and 2 client processes (--tokperf-client-procs) against the
null server, which is pinned to the last core; the clients get the other cores.

With the server's stream written at once ("burst") the client is the bottleneck, so
output tokens/s is what the client processes sustain. Each count alternates --repeats
times; the median is shown.

Run: python benchmarks/client_procs.py [--requests 2048 --tokens 256 --concurrency 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from pytest_tokperf import driver, launcher, metrics, procs
from pytest_tokperf.engines import Request

SERVER = Path(__file__).with_name("null_openai_server.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--pace-ms", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--procs", default="1,2")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    cmd = f"{sys.executable} {SERVER} --port {{port}} --pace-ms {args.pace_ms}"
    if args.pace_ms <= 0:
        cmd += " --whole"
    if len(cores) > 1:
        cmd = f"taskset -c {cores[-1]} {cmd}"
        os.sched_setaffinity(0, set(cores[:-1]))  # client processes inherit this
    server = launcher.start(cmd, ready_timeout_s=60)
    spawn = procs.Spawn("openai", {"base_url": server.base_url}, 1)
    reqs = [Request(f"r{i}", "x", args.tokens) for i in range(args.requests)]
    plan = driver.Plan("concurrency", concurrency=args.concurrency, texts=False)
    counts = [int(n) for n in args.procs.split(",")]
    rates: dict[int, list[float]] = {n: [] for n in counts}
    print(
        f"client cores {cores[:-1] or cores}, server core {cores[-1]}; {args.requests} "
        f"requests x {args.tokens} tokens, concurrency {args.concurrency}, pace {args.pace_ms} ms"
    )
    try:
        for _ in range(args.repeats):
            for n in counts:
                driven = procs.run(spawn, reqs, plan, n)
                assert sum(r.output_tokens for r in driven.records) == args.requests * args.tokens
                cpus = [f"{p.cpu:.0%}" for p in driven.procs]
                rates[n].append(metrics.output_tokens_per_s(driven.records))
                print(f"  {n} procs: {rates[n][-1]:,.0f} tokens/s, driver CPU {', '.join(cpus)}")
    finally:
        server.stop()
    for n in counts:
        print(f"{n} client processes: median {statistics.median(rates[n]):,.0f} output tokens/s")


if __name__ == "__main__":
    main()
