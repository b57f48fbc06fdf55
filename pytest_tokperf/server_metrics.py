"""The server's own counters beside the client's: its Prometheus `/metrics`, scraped at
the start of a measured run, every few seconds during it, and at its end. The scrapes
during the run come from a child process: on the event loop, or in a thread, parsing a
page would hold the interpreter while tokens arrive (delaying their timestamps), and a
process's first thread makes glibc lock on every socket read from then on.

Known servers and the series read (sample names as exposed, summed over labels):
vLLM (`vllm/v1/metrics/loggers.py`), SGLang (docs "Production Metrics"), llama.cpp's
server (`--metrics`, tools/server/README.md) and TensorRT-LLM (`tensorrt_llm/metrics/
collector.py`, whose counters are per request: it exposes no generated-token counter).
A generated-token count that disagrees with the client's by more than 1% makes the run
INVALID (`disagreement`); a queue still full at the end of an Offline run is noted.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

EVERY_S = 5.0
SCRAPE_TIMEOUT_S = 5.0
TOLERANCE = 0.01  # server and client token counts may differ by this share
SETTLE_S = (0.5, 1.0, 2.0)  # counters some servers update after the stream ended


@dataclass(frozen=True)
class Names:
    """The series of one server (first present name wins: names changed over versions)."""

    tokens: tuple[str, ...] = ()
    queue: tuple[str, ...] = ()
    running: tuple[str, ...] = ()
    kv_cache: tuple[str, ...] = ()
    prefix_hits: tuple[str, ...] = ()
    requests: tuple[str, ...] = ()


SERVERS: dict[str, Names] = {
    "vllm": Names(
        tokens=("vllm:generation_tokens_total",),
        queue=("vllm:num_requests_waiting",),
        running=("vllm:num_requests_running",),
        kv_cache=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        prefix_hits=("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"),
        requests=("vllm:request_success_total",),
    ),
    "sglang": Names(
        tokens=("sglang:generation_tokens_total",),
        queue=("sglang:num_queue_reqs",),
        running=("sglang:num_running_reqs",),
        kv_cache=("sglang:token_usage",),
        prefix_hits=("sglang:cached_tokens_total",),
        requests=("sglang:num_requests_total",),
    ),
    "llama.cpp": Names(
        tokens=("llamacpp:tokens_predicted_total",),
        queue=("llamacpp:requests_deferred",),
        running=("llamacpp:requests_processing",),
        kv_cache=("llamacpp:kv_cache_usage_ratio",),
    ),
    "tensorrt-llm": Names(
        requests=("trtllm_request_success_total", "trtllm:request_success_total"),
    ),
}


def parse(text: str) -> dict[str, float]:
    """Sample name -> value summed over its label sets (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue  # a timestamp, not a count
            values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    return values


def identify(values: Mapping[str, float]) -> str | None:
    for server, names in SERVERS.items():
        if any(n in values for field in _FIELDS for n in getattr(names, field)):
            return server
    return None


_FIELDS = ("tokens", "queue", "running", "kv_cache", "prefix_hits", "requests")


def _pick(values: Mapping[str, float], names: Sequence[str]) -> float | None:
    for name in names:
        if name in values:
            return values[name]
    return None


def scrape(url: str, timeout_s: float = SCRAPE_TIMEOUT_S) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return parse(response.read().decode("utf-8", "replace"))


def _scrape_once(url: str) -> tuple[dict[str, float] | None, str]:
    """The page's values, or None and why not."""
    try:
        return scrape(url), ""
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return None, f"cannot read {url}: {exc}"
    except ImportError:
        return None, (
            f"reading {url} needs prometheus-client: pip install 'pytest-tokperf[openai]'"
        )


def _child(url: str, every_s: str) -> None:
    """The scraper's process: a JSON line `[time.monotonic(), values or why not]` to
    stdout every `every_s`, until its stdin closes (the run's end, or the parent's death).
    Its scrapes run only when a core is otherwise idle (SCHED_IDLE): on the client's own
    core a read that arrives preempts one at once (at nice 19, Linux's EEVDF scheduler
    let a scrape run on for milliseconds). On cores kept busy, scrapes come late or
    not at all; the run's first and last scrapes are the parent's own."""
    import prometheus_client.parser  # noqa: F401  # the import's CPU before the policy

    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:  # pragma: no cover - not Linux
        os.nice(19)
    while not select.select([sys.stdin], [], [], float(every_s))[0]:
        values, error = _scrape_once(url)
        print(json.dumps([time.monotonic(), error if values is None else values]), flush=True)


# run as `python -c CHILD PATH URL EVERY_S`: this file alone, not the package (whose
# imports would cost the run's machine a second of CPU), and not from its directory
# (whose modules, such as html.py, would hide the standard library's)
CHILD = "import runpy, sys; del sys.path[0]; runpy.run_path(sys.argv[1])['_child'](*sys.argv[2:])"


class Watch:
    """Scrapes `url` at enter, every `every_s` from a child process, and at exit.

    A server without `/metrics` (or without a known series) leaves `summary` saying so;
    a run never fails for want of server counters.
    """

    def __init__(self, url: str | None, every_s: float = EVERY_S) -> None:
        self.url = url
        self.every_s = every_s
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.error: str | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._out: Any = None  # the child's output: a file, so it never blocks on a pipe

    def _scrape(self) -> dict[str, float] | None:
        assert self.url is not None
        values, error = _scrape_once(self.url)
        if values is None:
            self.error = error
            return None
        self.samples.append((time.monotonic(), values))
        return values

    def __enter__(self) -> Watch:
        if self.url is not None and self._scrape() is not None:
            self._out = tempfile.TemporaryFile()
            self._child = subprocess.Popen(
                [sys.executable, "-c", CHILD, __file__, self.url, repr(self.every_s)],
                stdin=subprocess.PIPE,
                stdout=self._out,
                stderr=subprocess.STDOUT,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        child = self._child
        if child is None:
            return
        assert child.stdin is not None
        child.stdin.close()  # the child's signal to stop, after a scrape in flight
        try:
            child.wait(timeout=SCRAPE_TIMEOUT_S + 10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        self._out.seek(0)
        for line in self._out.read().decode("utf-8", "replace").splitlines():
            try:
                at, values = json.loads(line)
            except (ValueError, TypeError):  # not a scrape: the child's failure (traceback)
                self.error = f"the /metrics scraper failed: {line}"
                continue
            if isinstance(values, dict):
                self.samples.append((at, values))
            else:
                self.error = values
        self._out.close()
        if child.returncode != 0 and self.error is None:
            self.error = f"the /metrics scraper exited with status {child.returncode}"
        self._scrape()

    def summary(self, client_tokens: int, scenario: str) -> dict[str, Any] | None:
        """The run's server counters beside the client's, JSON data; None without a URL."""
        if self.url is None:
            return None
        out: dict[str, Any] = {"url": self.url, "scrapes": len(self.samples)}
        if len(self.samples) < 2:
            out["error"] = self.error or "fewer than two scrapes"
            return out
        first = self.samples[0][1]
        server = identify(first)
        out["server"] = server
        if server is None:
            out["error"] = "no series of a known server (vLLM, SGLang, llama.cpp, TensorRT-LLM)"
            return out
        names = SERVERS[server]

        def delta(series: Sequence[str]) -> float | None:
            a, b = _pick(first, series), _pick(self.samples[-1][1], series)
            return None if a is None or b is None else b - a

        generated = delta(names.tokens)
        # counters may lag the stream's end by a scheduler step: look again a few times
        for wait in SETTLE_S:
            if generated is None or _agree(generated, client_tokens):
                break
            time.sleep(wait)
            if self._scrape() is None:
                break
            generated = delta(names.tokens)
        out["client_tokens"] = client_tokens
        out["generated_tokens"] = generated
        out["requests"] = delta(names.requests)
        out["prefix_cache_hits"] = delta(names.prefix_hits)
        for key, series in (("queue", names.queue), ("running", names.running),
                            ("kv_cache_usage", names.kv_cache)):  # fmt: skip
            seen = [v for _, values in self.samples if (v := _pick(values, series)) is not None]
            out[key] = {"max": max(seen), "end": seen[-1]} if seen else None
        queue = out["queue"]
        if scenario == "offline" and queue is not None:
            out["queue_drained"] = queue["end"] == 0
            if queue["end"] > 0:
                out["note"] = (
                    f"the server's queue ({names.queue[0]}) still held {queue['end']:g} "
                    "requests at the end of the Offline run: it never drained"
                )
        return out


def _agree(server: float, client: int) -> bool:
    return abs(server - client) <= TOLERANCE * max(client, 1)


def disagreement(summary: Mapping[str, Any] | None) -> str | None:
    """The INVALID reason when the server's generated tokens and the client's disagree."""
    if not summary or summary.get("generated_tokens") is None:
        return None
    server, client = summary["generated_tokens"], summary["client_tokens"]
    if _agree(server, client):
        return None
    return (
        f"the server counted {server:,.0f} generated tokens ({summary['server']}, "
        f"{summary['url']}) but the client {client:,}: they differ by more than "
        f"{TOLERANCE:.0%} (another client on the server, or a miscounting tokenizer)"
    )


def url_for(info_settings: Mapping[str, Any], backend: str) -> str | None:
    """The /metrics URL of an openai engine's server; None for other backends."""
    base = info_settings.get("base_url") if backend == "openai" else None
    return f"{base}/metrics" if base else None
