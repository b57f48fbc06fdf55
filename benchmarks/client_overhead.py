"""The openai engine's client CPU time per streamed token, against a null server.

The server (benchmarks/null_openai_server.py, its own process, pinned to the last core
when it can be) answers instantly; the client (this process, pinned to core 0) runs the
plugin's real path: `load_engine("openai")` + `driver.run(..., scenario="offline")`.
Client CPU = user + system time of this process over the run, divided by the tokens it
received. "burst": the server writes each whole stream at once; "paced": one chunk per
stream every --pace-ms ms, so every token costs the client a wake-up, as with a real
server. Each configuration runs --repeats times; the median is reported.

Run: python benchmarks/client_overhead.py [--requests 2000 --tokens 256 --concurrency 64]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from pytest_tokperf import driver, launcher
from pytest_tokperf.engines import Request, load_engine

SERVER = Path(__file__).with_name("null_openai_server.py")


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(base_url: str, requests: int, tokens: int, concurrency: int, uvloop: bool) -> float:
    engine = load_engine("openai", {"base_url": base_url, "max_connections": concurrency})
    loop = driver.new_loop() if uvloop else __import__("asyncio").new_event_loop()
    reqs = [Request(f"r{i}", "x", tokens) for i in range(requests)]
    try:
        driver.run(engine, reqs[:concurrency], loop=loop)  # warm the connection pool
        done = 0
        start = cpu_s()
        # offline issues everything at once; batches of `concurrency` keep that many in flight
        for i in range(0, requests, concurrency):
            records = driver.run(engine, reqs[i : i + concurrency], loop=loop)
            bad = [r.error for r in records if not r.ok]
            if bad:
                raise SystemExit(f"requests failed: {bad[:3]}")
            done += sum(r.output_tokens for r in records)
        return (cpu_s() - start) / done * 1e6
    finally:
        loop.run_until_complete(engine.aclose())
        loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--pace-ms", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    print(
        f"{args.requests} requests x {args.tokens} tokens, concurrency {args.concurrency}, "
        f"python {sys.version.split()[0]}, cores {len(cores)}"
    )
    print(f"{'mode':<8}{'loop':<8}{'us/token (median)':>20}{'runs':>30}")
    for mode, pace in (("burst", 0.0), ("paced", args.pace_ms)):
        cmd = f"{sys.executable} {SERVER} --port {{port}} --pace-ms {pace}"
        if len(cores) > 1 and os.path.exists("/usr/bin/taskset"):
            cmd = f"taskset -c {cores[-1]} {cmd}"
        server = launcher.start(cmd, ready_timeout_s=60)
        if len(cores) > 1 and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {cores[0]})
        try:
            for use_uvloop in (True, False):
                runs = [
                    measure(
                        server.base_url, args.requests, args.tokens, args.concurrency, use_uvloop
                    )
                    for _ in range(args.repeats)
                ]
                name = "uvloop" if use_uvloop else "asyncio"
                shown = ", ".join(f"{r:.1f}" for r in runs)
                print(f"{mode:<8}{name:<8}{statistics.median(runs):>20.1f}{shown:>30}")
        finally:
            server.stop()
            if hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, set(cores))
    time.sleep(0)


if __name__ == "__main__":
    main()
