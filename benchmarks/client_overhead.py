"""The openai engine's client CPU time per streamed token, beside the raw-socket floor.

The server (benchmarks/null_openai_server.py, its own process, pinned to the last core
when it can be) answers instantly; the client (this process, pinned to core 0) runs,
in turn, the plugin's real path (`load_engine("openai")` + the driver's `concurrency`
scenario, a closed loop, texts not kept as in a perf run) and the floor client
(benchmarks/floor_client.py: an `asyncio.Protocol` that counts `data:` events and
timestamps reads, nothing else), both on uvloop, both keeping their keep-alive
connections from run to run. Client CPU = user + system time of this process over a
run (checking and counting its result not included), divided by the tokens received;
the floor does not check the response's status, find its first token, read its usage
or make a record per request, which the plugin must. The server writes each token's
chunk on its own: "burst", back to back as fast as it can; "paced", one chunk per
stream every --pace-ms ms, so every token costs the client a wake-up, as with a real
server. "one-write": each whole answer in one write, so a client reads it in one or
two reads and what it costs is nearly all per request, not per token. The two clients
run --repeats pairs, each pair in the other order from the last (a drift on the host
favours neither); the table shows medians, the median of the paired ratios with a
distribution-free 95% interval, and whether that interval is all at or below --target
("yes"), all above ("no"), or neither ("can't tell").

Run: python benchmarks/client_overhead.py [--requests 2000 --paced-requests 640 --repeats 21]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).parent))

import floor_client

from pytest_tokperf import driver, launcher
from pytest_tokperf.engines import Request, load_engine

SERVER = Path(__file__).with_name("null_openai_server.py")
T = TypeVar("T")


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def per_token(run: Callable[[], T], count: Callable[[T], tuple[int, int]]) -> tuple[float, float]:
    """Client CPU per token of one run, and its tokens per socket read (how much the
    server's writes coalesced: fewer reads cost less; the plugin's reads are those left
    with tokens once settled, the floor's every read with an event, so a paced answer's
    last read, usage and [DONE] alone, counts for the floor only); checking and counting
    its result is not timed."""
    start = cpu_s()
    result = run()
    used = cpu_s() - start
    tokens, reads = count(result)
    return used / tokens * 1e6, tokens / max(1, reads)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--paced-requests", type=int, default=640, help="paced runs take longer")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--pace-ms", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--target", type=float, default=1.1, help="the ratio the issue asks for")
    parser.add_argument("--modes", default="burst,paced,one-write")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    print(
        f"{time.strftime('%Y-%m-%d')}, {cpu_name()}, {len(cores)} cores, python "
        f"{sys.version.split()[0]}; {args.requests} requests ({args.paced_requests} paced) x "
        f"{args.tokens} tokens, concurrency {args.concurrency}, {args.repeats} alternating runs "
        f"each; load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'mode':<10}{'tokperf us/token':>17}{'floor us/token':>15}{'ratio':>7}{'95% CI':>13}"
        f"  {'<= ' + format(args.target, 'g'):<9}{'tokens/read':>12}   runs (tokperf/floor)"
    )
    for mode in args.modes.split(","):
        ours, theirs = measure(mode, args, cores)
        ratios = [a[0] / b[0] for a, b in zip(ours, theirs, strict=True)]
        ratio = statistics.median(ratios)
        interval = median_interval(ratios)
        if interval is None:
            bounds, met = "n/a", "can't tell"
        else:
            bounds = f"{interval[0]:.2f}-{interval[1]:.2f}"
            met = (
                "yes"
                if interval[1] <= args.target
                else "no"
                if interval[0] > args.target
                else "can't tell"
            )
        runs = ", ".join(f"{a[0]:.2f}/{b[0]:.2f}" for a, b in zip(ours, theirs, strict=True))
        per_read = (
            f"{statistics.median(a[1] for a in ours):.1f}/"
            f"{statistics.median(b[1] for b in theirs):.1f}"
        )
        print(
            f"{mode:<10}{statistics.median(a[0] for a in ours):>17.2f}"
            f"{statistics.median(b[0] for b in theirs):>15.2f}{ratio:>7.2f}{bounds:>13}  {met:<9}"
            f"{per_read:>12}   {runs}"
        )


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free interval for the median (order statistics of a binomial(n, 1/2)
    count); None when there are too few values for `level`. The paired ratios are
    independent draws of the noisy machine, so their median's interval says whether the
    target is met, missed or cannot be told apart from the noise."""
    xs, n = sorted(values), len(values)
    k, below = 0, 0.0  # the largest k with P(count < k) <= (1 - level) / 2
    while below + math.comb(n, k) / 2**n <= (1 - level) / 2:
        below += math.comb(n, k) / 2**n
        k += 1
    return None if k == 0 else (xs[k - 1], xs[n - k])


def measure(
    mode: str, args: argparse.Namespace, cores: list[int]
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Per-token client CPU (and tokens per read) of tokperf and of the floor,
    alternating, against one server."""
    count = args.paced_requests if mode == "paced" else args.requests
    reqs = [Request(f"r{i}", "x", args.tokens) for i in range(count)]
    expected = count * args.tokens
    plan = driver.Plan("concurrency", concurrency=args.concurrency, texts=False)
    pace = args.pace_ms if mode == "paced" else 0.0
    cmd = f"{sys.executable} {SERVER} --port {{port}} --pace-ms {pace}"
    if mode == "one-write":
        cmd += " --whole"
    if len(cores) > 1 and os.path.exists("/usr/bin/taskset"):
        cmd = f"taskset -c {cores[-1]} {cmd}"
    server = launcher.start(cmd, ready_timeout_s=60)
    if len(cores) > 1 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cores[0]})
    loop = driver.new_loop()
    engine = load_engine("openai", {"base_url": server.base_url})

    def tokperf() -> tuple[driver.RequestRecord, ...]:
        return driver.run_plan(engine, reqs, plan, loop=loop).records

    def counted(records: tuple[driver.RequestRecord, ...]) -> tuple[int, int]:
        bad = [r.error for r in records if not r.ok]
        if bad:
            raise SystemExit(f"requests failed: {bad[:3]}")
        return sum(r.output_tokens for r in records), sum(len(r.chunk_ns) for r in records)

    def floor() -> int:
        run = floor_client.run(server.base_url, count, args.tokens, args.concurrency)
        return loop.run_until_complete(run)

    def floor_reads() -> int:  # reads with events, as its connections timestamped them
        return sum(len(c.times) for c in floor_client.POOLS.get((loop, server.base_url), []))

    try:  # warm both: connections (kept by both between runs), code paths
        if counted(tokperf())[0] != expected or floor() != expected:
            raise SystemExit(f"a client did not count {expected} tokens")
        ours, theirs = [], []
        for i in range(args.repeats):  # each pair's order alternates: a drift favours neither
            if i % 2:
                ours.append(per_token(tokperf, counted))
            before = floor_reads()
            theirs.append(per_token(floor, lambda n, b=before: (n, floor_reads() - b)))  # type: ignore[misc]
            if not i % 2:
                ours.append(per_token(tokperf, counted))
        return ours, theirs
    finally:
        loop.run_until_complete(engine.aclose())
        loop.close()
        server.stop()
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(cores))


if __name__ == "__main__":
    main()
