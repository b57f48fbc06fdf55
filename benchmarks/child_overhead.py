"""What the engine child process costs per streamed token.

A null worker in the child yields one-token chunks as fast as it can; the parent
streams them through `ChildEngine` (socket pair, one pickled message per chunk, a
reader thread, `call_soon_threadsafe` into the event loop). Wall time per token is
the most the channel can carry; the parent's CPU time per token is what the pytest
process pays. Compare with the embedded model's ~9,000 µs per token here.

    python benchmarks/child_overhead.py --tokens 20000 --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pytest_tokperf.engines import Chunk, EngineInfo, Request
from pytest_tokperf.engines.child import ChildEngine


class NullWorker:
    info = EngineInfo("null", "null", "none", 1)

    def generate(self, request: Request, stop: Callable[[], bool]) -> Iterator[Chunk]:
        for i in range(request.max_tokens):
            if stop():
                return
            yield Chunk(1, "x", (i,))

    def close(self) -> None:
        pass


def build(settings: Mapping[str, Any]) -> NullWorker:
    return NullWorker()


async def stream(engine: ChildEngine, tokens: int) -> int:
    got = 0
    async for chunk in engine.stream(Request("r", "", tokens)):
        got += chunk.tokens
    return got


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    engine = ChildEngine("benchmarks.child_overhead:build", {})
    walls, cpus = [], []
    try:
        asyncio.run(stream(engine, 100))  # warm-up
        for _ in range(args.repeats):
            wall0, cpu0 = time.perf_counter_ns(), time.process_time_ns()
            got = asyncio.run(stream(engine, args.tokens))
            assert got == args.tokens
            walls.append((time.perf_counter_ns() - wall0) / got / 1000)
            cpus.append((time.process_time_ns() - cpu0) / got / 1000)
    finally:
        asyncio.run(engine.aclose())
    print(
        f"{args.tokens} tokens x {args.repeats}: wall {statistics.median(walls):.1f} µs/token, "
        f"parent CPU {statistics.median(cpus):.1f} µs/token (medians; "
        f"walls {', '.join(f'{w:.1f}' for w in walls)})"
    )


if __name__ == "__main__":
    main()
