"""Harness fidelity: does measuring through pytest-tokperf cost the embedded engine throughput?

Compares, on the same machine in one run, two ways of generating the same tokens:

* bare: a plain llama-cpp-python loop. One `llama_cpp.Llama` loaded with the settings
  the plugin's llamacpp engine passes (model file, n_ctx, n_batch, n_threads,
  n_threads_batch, seed, verbose=False); each request's prompt is formatted with the
  GGUF's chat template (`Jinja2ChatFormatter`) and tokenized the way the engine does,
  the context is reset, and greedy decoding with the engine's sampler arguments runs
  until an end-of-generation token or max_tokens. Requests run one after another; the
  rate is output tokens / (first request start -> last request end).
* plugin: `load_engine("llamacpp", ...)` + `driver.run(..., scenario="offline")` +
  `metrics.summarize(...)`, whose `tokens_per_s` is the number the plugin reports.

Both models are loaded once before any timing, and each path gets one untimed warm-up
over the same requests. At start the script asserts that its own prompt formatting
yields the same token ids as the engine's `prompt_tokens` for every prompt, and after
the warm-ups it checks that both paths produced the same number of output tokens per
request (greedy decoding is deterministic). Rounds alternate the order (bare first,
then plugin first) to cancel drift; a ratio plugin/bare below 1 is what the harness
costs.

Run:

    python benchmarks/fidelity.py --rounds 7
    python benchmarks/fidelity.py --rounds 2 --requests 4 --max-tokens 16  # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from pytest_tokperf import driver, metrics, workloads
from pytest_tokperf.engines import Request, load_engine
from pytest_tokperf.engines.llamacpp import (
    LlamaCppEngine,
    default_threads,
    plain_llama,
    shipped_model_path,
)

# Passed explicitly to both paths (they equal the engine's defaults), so both load the
# model identically even if the plugin's defaults change.
N_CTX = 2048
N_BATCH = 512
SEED = 0
# The engine's greedy sampler arguments (LlamaCppEngine._generate).
SAMPLER: dict[str, Any] = {
    "top_k": 1,
    "top_p": 1.0,
    "min_p": 0.0,
    "temp": 0.0,
    "repeat_penalty": 1.0,
}
BOOTSTRAP_SEED = 20240601
BOOTSTRAP_RESAMPLES = 2000
NS = 1_000_000_000


@dataclass(frozen=True)
class Measurement:
    """One timed pass over the requests by one path."""

    tokens: int
    span_ns: int
    tokens_per_s: float
    per_request: dict[str, int]


@dataclass(frozen=True)
class Round:
    index: int
    order: str
    bare: Measurement
    plugin: Measurement

    @property
    def ratio(self) -> float:
        return self.plugin.tokens_per_s / self.bare.tokens_per_s


class BareLlama:
    """The plain llama-cpp-python loop: no asyncio, no threads, no per-token callbacks."""

    def __init__(self, model_path: Path, threads: int) -> None:
        self.llm = plain_llama(  # as the engine loads it (no AMX repacking on AMX CPUs)
            model_path=str(model_path),
            n_ctx=N_CTX,
            n_batch=N_BATCH,
            n_threads=threads,
            n_threads_batch=threads,
            seed=SEED,
            verbose=False,
        )
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise SystemExit(f"{model_path}: the GGUF file has no chat template")
        self.formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self._special_text(self.llm.token_eos()),
            bos_token=self._special_text(self.llm.token_bos()),
        )
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.eog = frozenset(
            t for t in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)
        )

    def _special_text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", "replace")

    def prompt_tokens(self, prompt: str) -> list[int]:
        text = self.formatter(messages=[{"role": "user", "content": prompt}]).prompt
        tokens: list[int] = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return tokens

    def complete(self, request: Request) -> int:
        """Generate greedily for one request; the number of output tokens."""
        tokens = self.prompt_tokens(request.prompt)
        if len(tokens) + request.max_tokens > self.llm.n_ctx():
            raise SystemExit(f"{request.id}: prompt + max_tokens exceeds n_ctx {N_CTX}")
        self.llm.reset()
        produced = 0
        for token in self.llm.generate(tokens, reset=False, **SAMPLER):
            if token in self.eog:
                break
            produced += 1
            if produced >= request.max_tokens:
                break
        return produced

    def run(self, requests: Sequence[Request]) -> Measurement:
        counts: dict[str, int] = {}
        start = time.perf_counter_ns()
        for request in requests:
            counts[request.id] = self.complete(request)
        span = time.perf_counter_ns() - start
        tokens = sum(counts.values())
        return Measurement(tokens, span, tokens * NS / span, counts)

    def close(self) -> None:
        self.llm.close()


def load_plugin(model_path: Path, threads: int) -> LlamaCppEngine:
    settings = {
        "model_path": str(model_path),
        "n_ctx": N_CTX,
        "n_batch": N_BATCH,
        "n_threads": threads,
    }
    engine = load_engine("llamacpp", settings)
    if not isinstance(engine, LlamaCppEngine):
        raise SystemExit(f"expected a LlamaCppEngine, got {type(engine).__name__}")
    loaded = engine.info.settings
    if (loaded.get("n_ctx"), loaded.get("n_threads")) != (N_CTX, threads):
        raise SystemExit(f"the plugin's engine did not take the settings: {dict(loaded)}")
    return engine


def run_plugin(
    engine: LlamaCppEngine, requests: Sequence[Request], workload: str, max_tokens: int
) -> Measurement:
    records = driver.run(engine, requests, scenario="offline")
    result = metrics.summarize(
        records, engine.info, scenario="offline", workload=workload, max_tokens=max_tokens
    )
    if result.failed:
        raise SystemExit("plugin run had failed requests:\n  " + "\n  ".join(result.errors))
    per_request = {r.id: r.output_tokens for r in result.records}
    span = metrics.span_ns(result.records)
    return Measurement(result.output_tokens, span, result.tokens_per_s, per_request)


def check_prompt_tokens(
    bare: BareLlama, engine: LlamaCppEngine, requests: Sequence[Request]
) -> None:
    """Both paths must feed the model identical prompt token ids."""
    for prompt in sorted({r.prompt for r in requests}):
        ours, theirs = bare.prompt_tokens(prompt), engine.prompt_tokens(prompt)
        if ours != theirs:
            raise SystemExit(
                f"prompt token ids differ for {prompt[:40]!r}...: bare {len(ours)} tokens, "
                f"plugin {len(theirs)} tokens; the comparison would not be the same work"
            )


def count_mismatches(bare: Measurement, plugin: Measurement) -> list[str]:
    return [
        f"{rid}: bare {n} tokens, plugin {plugin.per_request.get(rid)} tokens"
        for rid, n in bare.per_request.items()
        if plugin.per_request.get(rid) != n
    ]


def measure_round(
    index: int,
    bare: BareLlama,
    engine: LlamaCppEngine,
    requests: Sequence[Request],
    workload: str,
    max_tokens: int,
) -> Round:
    """Round 1 runs bare first, round 2 plugin first, and so on."""
    if index % 2 == 1:
        a = bare.run(requests)
        b = run_plugin(engine, requests, workload, max_tokens)
        return Round(index, "bare>plugin", a, b)
    b = run_plugin(engine, requests, workload, max_tokens)
    a = bare.run(requests)
    return Round(index, "plugin>bare", a, b)


def bootstrap_median_ci(
    values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median."""
    rng = random.Random(seed)
    medians = [statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples)]
    cuts = statistics.quantiles(medians, n=40, method="inclusive")  # 2.5%, 5%, ..., 97.5%
    return cuts[0], cuts[-1]


def ratio_summary(ratios: Sequence[float]) -> dict[str, float | None]:
    lo, hi = bootstrap_median_ci(ratios) if len(ratios) > 1 else (ratios[0], ratios[0])
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "mean": statistics.fmean(ratios),
        "stdev": statistics.stdev(ratios) if len(ratios) > 1 else None,
        "median_ci95_low": lo,
        "median_ci95_high": hi,
    }


def machine_facts(model_path: Path, threads: int) -> dict[str, Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "llama_cpp_python": getattr(llama_cpp, "__version__", "unknown"),
        "model_file": model_path.name,
        "threads": threads,
        "n_ctx": N_CTX,
        "n_batch": N_BATCH,
    }


def print_rounds(rounds: Sequence[Round]) -> None:
    print(f"{'round':>5}  {'order':<11}  {'bare tok/s':>10}  {'plugin tok/s':>12}  {'ratio':>7}")
    for r in rounds:
        print(
            f"{r.index:>5}  {r.order:<11}  {r.bare.tokens_per_s:>10.1f}  "
            f"{r.plugin.tokens_per_s:>12.1f}  {r.ratio:>7.4f}"
        )


def print_summary(summary: dict[str, float | None], facts: dict[str, Any]) -> None:
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    print()
    print(f"ratio plugin/bare: median {fmt(summary['median'])}")
    print(f"  min {fmt(summary['min'])}, max {fmt(summary['max'])}")
    print(f"  mean {fmt(summary['mean'])}, sample stdev {fmt(summary['stdev'])}")
    print(
        f"  95% bootstrap CI of the median ({BOOTSTRAP_RESAMPLES} resamples, seed "
        f"{BOOTSTRAP_SEED}): [{fmt(summary['median_ci95_low'])}, "
        f"{fmt(summary['median_ci95_high'])}]"
    )
    print()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=7, help="timed A/B rounds (default 7)")
    parser.add_argument("--requests", type=int, default=16, help="requests per pass (default 16)")
    parser.add_argument("--max-tokens", type=int, default=64, help="per request (default 64)")
    parser.add_argument("--workload", default="default", help="built-in set name or JSONL path")
    parser.add_argument("--model-path", type=Path, help="GGUF file (default: the shipped one)")
    parser.add_argument("--threads", type=int, help="default: the plugin's default_threads()")
    parser.add_argument("--json", type=Path, help="write raw per-round numbers and the summary")
    args = parser.parse_args(argv)
    for name in ("rounds", "requests", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def write_json(
    path: Path,
    args: argparse.Namespace,
    facts: dict[str, Any],
    warmup: tuple[Measurement, Measurement],
    mismatches: list[str],
    rounds: Sequence[Round],
    summary: dict[str, float | None],
) -> None:
    doc = {
        "config": {
            "rounds": args.rounds,
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "workload": args.workload,
            "sampler": SAMPLER,
        },
        "machine": facts,
        "warmup": {"bare": asdict(warmup[0]), "plugin": asdict(warmup[1])},
        "token_count_mismatches": mismatches,
        "rounds": [
            {
                "round": r.index,
                "order": r.order,
                "bare": asdict(r.bare),
                "plugin": asdict(r.plugin),
                "ratio": r.ratio,
            }
            for r in rounds
        ],
        "summary": summary,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n", "utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    model_path = args.model_path or shipped_model_path()
    threads = args.threads or default_threads()
    workload = workloads.load(args.workload)
    requests = workload.requests(args.requests, args.max_tokens, args.max_tokens)

    bare = BareLlama(model_path, threads)
    engine = load_plugin(model_path, threads)
    try:
        check_prompt_tokens(bare, engine, requests)
        warmup = (bare.run(requests), run_plugin(engine, requests, workload.name, args.max_tokens))
        mismatches = count_mismatches(*warmup)
        if mismatches:
            print("WARNING: output token counts differ between bare and plugin:", file=sys.stderr)
            for line in mismatches:
                print(f"  {line}", file=sys.stderr)
        rounds = [
            measure_round(i, bare, engine, requests, workload.name, args.max_tokens)
            for i in range(1, args.rounds + 1)
        ]
    finally:
        bare.close()
        asyncio.run(engine.aclose())

    summary = ratio_summary([r.ratio for r in rounds])
    facts = machine_facts(model_path, threads)
    print(
        f"{len(requests)} requests x max {args.max_tokens} tokens from workload "
        f"{workload.name!r}; warm-up output tokens: bare {warmup[0].tokens}, "
        f"plugin {warmup[1].tokens}"
    )
    print_rounds(rounds)
    print_summary(summary, facts)
    if args.json:
        write_json(args.json, args, facts, warmup, mismatches, rounds, summary)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
