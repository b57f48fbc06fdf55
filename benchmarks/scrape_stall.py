"""How late a client's event loop runs while the server's /metrics is scraped.

A token's timestamp is taken when the event loop gets to its socket read; whatever holds
the interpreter meanwhile delays it. The loop here wakes every millisecond for
--seconds and records how late each wake-up came, three ways in turn: with no scrape,
with the plugin's scraper (`server_metrics.Watch`: a child process) and with the
same scrape (`server_metrics.scrape`: fetch and parse) in a thread of this process.
The page is a generated Prometheus text page of --page-kb KB (histograms, as servers
expose for their latencies), served by benchmarks/null_openai_server.py on the last
core; it is scraped every --every-s seconds. This process is pinned to core 0 (on
Linux), and so is the scraper's child process, which inherits that: the worst case,
where the scraper shares the client's core.

Run: python benchmarks/scrape_stall.py [--seconds 20 --every-s 0.5 --page-kb 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from pytest_tokperf import launcher, server_metrics

SERVER = Path(__file__).with_name("null_openai_server.py")


def page(kb: int) -> str:
    """A Prometheus text page of about `kb` KB: vLLM-style histograms, 30 buckets each."""
    lines = ["# TYPE vllm:generation_tokens_total counter", "vllm:generation_tokens_total 1"]
    n = 0
    while sum(map(len, lines)) < kb * 1024:
        name = f"vllm:latency_{n}_seconds"
        labels = 'engine="0",model_name="meta-llama/Llama-2-70b-chat-hf"'
        lines += [f"# HELP {name} A latency.", f"# TYPE {name} histogram"]
        for i in range(30):
            lines.append(f'{name}_bucket{{{labels},le="{0.001 * 2**i:g}"}} {i * 17}')
        lines += [f'{name}_bucket{{{labels},le="+Inf"}} 510', f"{name}_count{{{labels}}} 510"]
        lines.append(f"{name}_sum{{{labels}}} 12.5")
        n += 1
    return "\n".join(lines) + "\n"


def lateness_ms(seconds: float) -> list[float]:
    """Every wake-up's delay past its deadline, a wake-up every millisecond."""

    async def tick() -> list[float]:
        late = []
        end = time.perf_counter() + seconds
        while (now := time.perf_counter()) < end:
            await asyncio.sleep(0.001)
            late.append((time.perf_counter() - now - 0.001) * 1e3)
        return late

    return asyncio.run(tick())


def in_thread(url: str, every_s: float, seconds: float) -> tuple[list[float], int]:
    stop = threading.Event()
    done = [0]

    def scrape() -> None:
        while not stop.wait(every_s):
            server_metrics.scrape(url)
            done[0] += 1

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    late = lateness_ms(seconds)
    stop.set()
    thread.join()
    return late, done[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--every-s", type=float, default=0.5)
    parser.add_argument("--page-kb", type=int, default=100)
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile("w", suffix=".prom", delete=False) as f:
        f.write(page(args.page_kb))
    pin = f"taskset -c {os.cpu_count() - 1} " if sys.platform == "linux" else ""
    cmd = f"{pin}{sys.executable} {SERVER} --port {{port}} --metrics {f.name}"
    server = launcher.start(cmd, ready_timeout_s=60)
    if sys.platform == "linux":
        os.sched_setaffinity(0, {0})
    url = f"{server.base_url}/metrics"
    try:
        start = time.perf_counter()
        server_metrics.scrape(url)
        parse_ms = (time.perf_counter() - start) * 1e3
        rows = [("no scrape", lateness_ms(args.seconds), 0)]
        watch = server_metrics.Watch(url, args.every_s)
        with watch:
            late = lateness_ms(args.seconds)
        rows.append(("child process (Watch)", late, len(watch.samples) - 2))
        rows.append(("thread", *in_thread(url, args.every_s, args.seconds)))
    finally:
        server.stop()
        os.unlink(f.name)
    print(
        f"page {args.page_kb} KB, one scrape here {parse_ms:.1f} ms; a scrape every "
        f"{args.every_s:g} s; wake-ups every 1 ms for {args.seconds:g} s each"
    )
    print(f"{'scraper':<24}{'scrapes':>8}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'max ms':>9}")
    for name, late, scrapes in rows:
        late.sort()
        q = [late[min(len(late) - 1, int(p * len(late)))] for p in (0.5, 0.99, 0.999)]
        print(f"{name:<24}{scrapes:>8}{q[0]:>9.3f}{q[1]:>9.3f}{q[2]:>10.3f}{late[-1]:>9.3f}")


if __name__ == "__main__":
    main()
