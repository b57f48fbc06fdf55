"""How long the embedded engine takes to come back after its child process dies.

For each signal: stream a request, send the signal to the child after 4 tokens
(os.kill, as a crash or `kill -9` would), and time (a) until the request fails with
the reason and (b) until the next request's first token, which needs a fresh child
that loads the model again. Also: a `kill -9` between requests, and a plain load.

    python benchmarks/child_recovery.py --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import time

from pytest_tokperf.engines import Request, load_engine
from pytest_tokperf.engines.llamacpp import LlamaCppEngine

REQUEST = Request("r", "Write a long story about a dragon.", 64)


async def first_token(engine: LlamaCppEngine) -> None:
    async for _ in engine.stream(REQUEST):
        return


async def kill_mid_stream(engine: LlamaCppEngine, sig: int) -> tuple[float, float, str]:
    seen, killed = 0, 0.0
    try:
        async for chunk in engine.stream(REQUEST):
            seen += chunk.tokens
            if seen == 4:
                pid = engine.child_pid
                assert pid is not None
                os.kill(pid, sig)
                killed = time.monotonic()
        raise SystemExit("the request finished although its child was killed")
    except Exception as exc:  # what the driver records as the request's error
        failed, error = time.monotonic() - killed, str(exc).splitlines()[0]
    await first_token(engine)
    return failed, time.monotonic() - killed, error


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    t0 = time.monotonic()
    engine = load_engine("llamacpp", {})
    assert isinstance(engine, LlamaCppEngine)
    print(f"load (child start + model): {time.monotonic() - t0:.2f} s")
    try:
        for sig in (signal.SIGSEGV, signal.SIGKILL):
            fails, backs = [], []
            for _ in range(args.repeats):
                failed, back, error = asyncio.run(kill_mid_stream(engine, sig))
                fails.append(failed)
                backs.append(back)
            print(
                f"{sig.name} mid-stream: request failed after median {statistics.median(fails):.2f}"
                f" s, next first token after {statistics.median(backs):.2f} s ({error})"
            )
        backs = []
        for _ in range(args.repeats):
            pid = engine.child_pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            time.sleep(0.1)
            asyncio.run(first_token(engine))
            backs.append(time.monotonic() - killed)
        print(f"kill -9 between requests: next first token after {statistics.median(backs):.2f} s")
    finally:
        asyncio.run(engine.aclose())
    print(f"load average {os.getloadavg()[0]:.1f}, {args.repeats} repeats each")


if __name__ == "__main__":
    main()
