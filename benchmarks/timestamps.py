"""Do the openai engine's timestamps mean what they say? Against a real llama.cpp server.

A `python -m llama_cpp.server` (SmolLM2-135M Q4_1, one thread, pinned to the last
core when it can be; it sends no usage) serves --requests prompts at --concurrency,
--max-tokens each, to the plugin's real path (`load_engine("openai")` + the driver's
closed loop, texts not kept as in a perf run; this process pinned to core 0), once
per counting path: the server's tokenize endpoint (the default on this server, whose
model is listed by an alias) and the GGUF named with the `tokenizer` setting. For
each run it prints the recorded end minus the last chunk's time (median / max, ms),
TPOT p50 as recorded ((end - first chunk) / (tokens - 1)) beside the same from the
chunk times alone ((last chunk - first chunk) / (tokens - 1)), TTFT p50/p90, request
latency p50 and output tokens/s; percentiles by the plugin's rule (LoadGen's).

With --aiperf PATH (an `aiperf` 0.13 executable, in its own virtual environment:
never a dependency of the plugin) each round also runs NVIDIA AIPerf over the same
prompts in the same order (--custom-dataset-type single_turn, sequential), with a
tokenizer folder built from the same GGUF (transformers' GGUF loader; its counts
equal llama.cpp's), and the table shows each metric's median over the rounds and the
ratio plugin / AIPerf per counting path. AIPerf's numbers are its own JSON export's
(numpy-interpolated percentiles); the row "AIPerf, LoadGen rule" recomputes them from
its per-request export with the plugin's rule, so what is the rule and what is the
measurement can be told apart. The runs alternate (endpoint, GGUF, AIPerf, repeat):
a drift on the host favours none.

Every client reaches the server through tests/engine/sse_tap.py, a relay that times
the server's bytes with its own raw-socket code as they pass: the rows "tap" give the
same metrics from the relay's view of the very streams each tool measured (its TPOT:
(last token - first token) / (events with content - 1)), so a tool's own error is
its ratio to the tap of its own runs, apart from the server's speed in those runs.
On this 2-core machine a client that keeps core 0 busy slows the server on core 1
too (AIPerf's own processes keep it busy: its server ran 1.4x slower): then the
plugin / AIPerf ratios measure the server's speed under each, the tool / tap ratios
each tool's timing. --busy keeps core 0 busy for every run (a busy loop at nice 19,
which yields to both tools), so both tools' servers run under the same load.

--child measures the engine child's stamps instead (no server): a worker in a child
process (`ChildEngine`, as the llamacpp engine runs) yields a chunk every 10 ms,
carrying the time it was made; the delay from that to the chunk's recorded time is
shown for the driver's path (stamped in the child) and for the generic `stream`
path (stamped by the driver when the event loop gets the chunk: the socket, the
reader thread and the hop to the loop in between).

Run: python benchmarks/timestamps.py [--requests 24 --max-tokens 48 --concurrency 2
     --rounds 3 --aiperf /tmp/aiperf-venv/bin/aiperf]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_tokperf import driver, launcher, metrics, workloads
from pytest_tokperf.engines import Chunk, EngineInfo, Request, load_engine
from pytest_tokperf.engines.child import ChildEngine
from pytest_tokperf.engines.llamacpp import shipped_model_path

MS = 1e6
GREEDY = {"temperature": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}
TAP = Path(__file__).parents[1] / "tests" / "engine" / "sse_tap.py"
ROWS = ("ttft_p50", "ttft_p90", "tpot_p50", "e2e_p50", "tokens_per_s", "tokens")


def cpu_name() -> str:
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown CPU"
    return (
        f"{fields.get('model name', 'unknown CPU')} (family {fields.get('cpu family', '?')}, "
        f"model {fields.get('model', '?')})"
    )


def p(values: Sequence[float], q: float) -> float:
    return metrics.percentile(values, q)


class TickWorker:
    """The --child worker: a chunk every 10 ms, its token id the time it was made."""

    info = EngineInfo("tick", "none", "none", 1)

    def generate(self, request: Request, stop: Callable[[], bool]) -> Iterator[Chunk]:
        for _ in range(request.max_tokens):
            time.sleep(0.01)
            yield Chunk(1, "", (time.perf_counter_ns(),))

    def close(self) -> None:
        pass


def tick_worker(settings: Mapping[str, Any]) -> TickWorker:
    return TickWorker()


class StreamOnly:
    """An engine seen through the generic protocol alone (the driver stamps chunks)."""

    def __init__(self, engine: ChildEngine) -> None:
        self.engine, self.info = engine, engine.info

    def stream(self, request: Request) -> AsyncIterator[Chunk]:
        return self.engine.stream(request)

    async def aclose(self) -> None:
        pass


def child_delays() -> None:
    """The --child measurement (see the module docstring)."""
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p
    )
    child = ChildEngine(f"{Path(__file__).stem}:tick_worker", {})
    loop = driver.new_loop()
    try:
        for name, engine in (("child stamps", child), ("generic stream", StreamOnly(child))):
            for c in (1, 2):
                reqs = [Request(f"r{i}", "p", 50) for i in range(8)]
                plan = driver.Plan("concurrency", concurrency=c)
                recs = driver.run_plan(engine, reqs, plan, loop=loop).records
                us = sorted((at - made) / 1e3 for r in recs
                            for at, made in zip(r.chunk_ns, r.token_ids, strict=True))  # fmt: skip
                print(
                    f"{name:<15} concurrency {c}: chunk made -> recorded, us: median "
                    f"{p(us, 0.5):.0f}, p90 {p(us, 0.9):.0f}, p99 {p(us, 0.99):.0f}, max "
                    f"{us[-1]:.0f} ({len(us)} chunks)"
                )
    finally:
        loop.run_until_complete(child.aclose())
        loop.close()


def tap_stats(log: Path) -> dict[str, float]:
    """The metrics of the runs the tap logged since `log` was emptied, by the plugin's rule."""
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    rows = [r for r in rows if "first_ns" in r]
    tpot = [(r["last_token_ns"] - r["first_ns"]) / MS / (r["events"] - 1) for r in rows
            if r["events"] > 1]  # fmt: skip
    ttft = [(r["first_ns"] - r["request_ns"]) / MS for r in rows]
    span = max(r["end_ns"] for r in rows) - min(r["request_ns"] for r in rows)
    return {
        "ttft_p50": p(ttft, 0.5),
        "ttft_p90": p(ttft, 0.9),
        "tpot_p50": p(tpot, 0.5),
        "e2e_p50": p([(r["end_ns"] - r["request_ns"]) / MS for r in rows], 0.5),
        "tokens_per_s": sum(r["events"] for r in rows) / (span / 1e9),
        "tokens": sum(r["events"] for r in rows),
    }


def plugin_run(
    base_url: str,
    requests: list[Request],
    concurrency: int,
    tokenizer: str | None,
    body: dict[str, object],
) -> dict[str, object]:
    """One closed-loop run of the plugin; its numbers (ms, tokens/s) and the counting."""
    settings: dict[str, object] = {"base_url": base_url, "extra_body": body}
    settings["first_token_timeout_s"] = 900
    if tokenizer:
        settings["tokenizer"] = tokenizer
    engine = load_engine("openai", settings)
    loop = driver.new_loop()
    try:
        plan = driver.Plan("concurrency", concurrency=concurrency, texts=False)
        driven = driver.run_plan(engine, requests, plan, loop=loop)
        loop.run_until_complete(engine.aclose())
    finally:
        loop.close()
    recs = [r for r in driven.records if r.ok and r.chunk_ns]
    assert len(recs) == len(requests), [r.error for r in driven.records if r.error]
    lags = [(r.end_ns - r.chunk_ns[-1]) / MS for r in recs]
    many = [r for r in recs if r.output_tokens > 1]
    tpot = [(metrics.tpot_s(r) or 0.0) * 1e3 for r in many]
    chunks = [(r.chunk_ns[-1] - r.chunk_ns[0]) / MS / (r.output_tokens - 1) for r in many]
    ttft = [(metrics.ttft_s(r) or 0.0) * 1e3 for r in recs]
    return {
        "lag_median": statistics.median(lags),
        "lag_max": max(lags),
        "tpot_p50": p(tpot, 0.5),
        "tpot_chunks_p50": p(chunks, 0.5),
        "ttft_p50": p(ttft, 0.5),
        "ttft_p90": p(ttft, 0.9),
        "e2e_p50": p([metrics.e2e_s(r) * 1e3 for r in recs], 0.5),
        "tokens_per_s": metrics.output_tokens_per_s(recs),
        "tokens": sum(r.output_tokens for r in recs),
        "counted_by": dict(driven.token_counting),
    }


def tokenizer_folder(folder: Path) -> Path:
    """A Hugging Face tokenizer folder for AIPerf, built from the shipped GGUF."""
    from transformers import AutoTokenizer

    gguf = shipped_model_path()
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)
    return folder


def aiperf_run(
    aiperf: str,
    base_url: str,
    requests: list[Request],
    concurrency: int,
    tokenizer: Path,
    body: dict[str, object],
) -> tuple[dict[str, float], dict[str, float]]:
    """One AIPerf run: its own summary, and its per-request records by the plugin's rule."""
    with tempfile.TemporaryDirectory(prefix="tokperf-aiperf-") as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"text": r.prompt}) + "\n" for r in requests))
        out = Path(tmp) / "out"
        max_tokens = requests[0].max_tokens
        cmd = [
            aiperf, "profile", "--model", "smollm2", "--url", base_url,
            "--endpoint-type", "chat", "--streaming", "--concurrency", str(concurrency),
            "--request-count", str(len(requests)), "--input-file", str(prompts),
            "--custom-dataset-type", "single_turn", "--dataset-sampling-strategy", "sequential",
            "--tokenizer", str(tokenizer), "--use-legacy-max-tokens",
            "--extra-inputs", json.dumps({"max_tokens": max_tokens, **body}),
            "--output-artifact-dir", str(out), "--ui-type", "none",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr)[-3000:]
            raise SystemExit(f"aiperf failed ({done.returncode}):\n{tail}")
        summary = json.loads((out / "profile_export_aiperf.json").read_text())
        rows = [json.loads(line)["metrics"] for line in (out / "profile_export.jsonl").open()]

    def own(name: str, key: str = "p50") -> float:
        return float(summary[name][key])

    theirs = {
        "ttft_p50": own("time_to_first_token"),
        "ttft_p90": own("time_to_first_token", "p90"),
        "tpot_p50": own("inter_token_latency"),
        "e2e_p50": own("request_latency"),
        "tokens_per_s": own("output_token_throughput", "avg"),
        "tokens": own("total_output_tokens", "avg"),
    }

    def col(name: str) -> list[float]:
        return [float(r[name]["value"]) for r in rows if name in r]

    ruled = {
        "ttft_p50": p(col("time_to_first_token"), 0.5),
        "ttft_p90": p(col("time_to_first_token"), 0.9),
        "tpot_p50": p(col("inter_token_latency"), 0.5),
        "e2e_p50": p(col("request_latency"), 0.5),
        "tokens_per_s": theirs["tokens_per_s"],
        "tokens": sum(col("output_sequence_length")),
    }
    return theirs, ruled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--min-tokens",
        type=int,
        help="llama_cpp.server's min_tokens (default --max-tokens: every answer runs to its "
        "length; 0: answers may end at EOS, whose [DONE] comes one decode step after the "
        "last token)",
    )
    parser.add_argument("--aiperf", help="an aiperf executable: run it side by side")
    parser.add_argument("--busy", action="store_true", help="core 0 busy in every run")
    parser.add_argument("--child", action="store_true", help="the engine child's stamps")
    args = parser.parse_args()
    min_tokens = args.max_tokens if args.min_tokens is None else args.min_tokens
    body: dict[str, object] = {**GREEDY, **({"min_tokens": min_tokens} if min_tokens else {})}
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    if args.child:
        print(f"{time.strftime('%Y-%m-%d')}, {cpu_name()}, {len(cores)} cores, load average "
              f"{os.getloadavg()[0]:.2f}")  # fmt: skip
        child_delays()
        return
    gguf = shipped_model_path()
    cmd = (
        f"{sys.executable} -m pytest_tokperf.engines.llamacpp_server "
        f"--model {gguf} --model_alias smollm2 "
        "--host 127.0.0.1 --port {port} --n_ctx 2048 --n_threads 1 --n_threads_batch 1 "
        "--verbose False --interrupt_requests False"
    )
    if len(cores) > 1 and os.path.exists("/usr/bin/taskset"):
        cmd = f"taskset -c {cores[-1]} {cmd}"
    print(
        f"{time.strftime('%Y-%m-%d')}, {cpu_name()}, {len(cores)} cores, python "
        f"{sys.version.split()[0]}; llama_cpp.server 1 thread on core {cores[-1]}, clients on "
        f"core {cores[0]}; {args.requests} requests x {args.max_tokens} tokens, concurrency "
        f"{args.concurrency}, min_tokens {min_tokens}, {args.rounds} rounds"
        f"{', core 0 busy (nice 19)' if args.busy else ''}; load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    server = launcher.start(cmd, ready_timeout_s=120)
    log = Path(tempfile.mkdtemp(prefix="tokperf-tap-")) / "tap.jsonl"
    log.touch()
    tap = launcher.start(
        f"{sys.executable} {TAP} --port {{port}} --upstream {server.base_url} --log {log}",
        ready_timeout_s=30,
    )
    if len(cores) > 1 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cores[0]})  # AIPerf's processes inherit it too
    requests = workloads.load(None).requests(args.requests, args.max_tokens, args.max_tokens)
    requests = [Request(r.id, r.prompt, r.max_tokens, detokenize=False) for r in requests]
    url, c = tap.base_url, args.concurrency
    runs: dict[str, list[Mapping[str, Any]]] = {}

    def keep(name: str, got: Mapping[str, Any]) -> None:
        runs.setdefault(name, []).append(got)
        runs.setdefault(f"{name} tap", []).append(tap_stats(log))
        log.write_text("")

    burner = None
    if args.busy:  # on core 0 with this process, below both tools' priority
        loop_forever = [sys.executable, "-c", "import os; os.nice(19)\nwhile True: pass"]
        burner = subprocess.Popen(loop_forever)
    try:
        plugin_run(url, requests[:2], 2, str(gguf), body)  # the server warms up
        log.write_text("")
        folder = None
        if args.aiperf:
            folder = tokenizer_folder(Path(tempfile.mkdtemp(prefix="tokperf-tok-")))
        for round_ in range(1, args.rounds + 1):
            for name, tokenizer in (("endpoint", None), ("gguf", str(gguf))):
                got = plugin_run(url, requests, c, tokenizer, body)
                keep(name, got)
                print(
                    f"round {round_} plugin, {name:<8} end - last chunk median "
                    f"{got['lag_median']:.2f} ms, max {got['lag_max']:.2f} ms; TPOT p50 "
                    f"{got['tpot_p50']:.2f} ms (from chunk times {got['tpot_chunks_p50']:.2f}); "
                    f"TTFT p50 {got['ttft_p50']:.0f} p90 {got['ttft_p90']:.0f} ms; e2e p50 "
                    f"{got['e2e_p50']:.0f} ms; {got['tokens_per_s']:.1f} tokens/s; "
                    f"{got['tokens']} tokens, counted by {got['counted_by']}",
                    flush=True,
                )
            if args.aiperf and folder is not None:
                theirs, ruled = aiperf_run(args.aiperf, url, requests, c, folder, body)
                keep("AIPerf", theirs)
                runs.setdefault("AIPerf, LoadGen rule", []).append(ruled)
                print(f"round {round_} AIPerf: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in theirs.items()), flush=True)  # fmt: skip
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
        tap.stop()
        server.stop()
    medians = {
        name: {k: statistics.median(float(r[k]) for r in rs) for k in ROWS}
        for name, rs in runs.items()
    }
    print(f"\nmedians over {args.rounds} rounds (ms, tokens/s, tokens); tap: the same runs")
    print(f"{'':<30}" + "".join(f"{k:>13}" for k in ROWS))
    for name, row in medians.items():
        print(f"{name:<30}" + "".join(f"{row[k]:>13.2f}" for k in ROWS))

    def ratio(a: str, b: str) -> None:
        if a in medians and b in medians:
            cells = "".join(f"{medians[a][k] / medians[b][k]:>13.3f}" for k in ROWS)
            print(f"{a + ' / ' + b:<30}" + cells)

    for name in ("endpoint", "gguf", "AIPerf"):
        ratio(name, f"{name} tap")
    ratio("endpoint", "AIPerf")
    ratio("gguf", "AIPerf")


if __name__ == "__main__":
    main()
